"""The networks ``make bench`` measures.

MLPs, a small transformer language model, torchvision's CNNs and ViT, a UNet, and the
examples' networks on digits. Each builder returns a freshly initialised network (the
caller seeds it); the :class:`~benchmarks.cases.ModelSpec` and
:class:`~benchmarks.cases.FitSpec` entries of :mod:`benchmarks.cases` say at which batch
and scale each is measured.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(*sizes: int) -> nn.Sequential:
    """ReLU MLP with the given layer widths."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class GPT(nn.Module):
    """GPT-style causal LM: pre-norm blocks, ``F.scaled_dot_product_attention``, a GELU MLP.

    Token and position embeddings, ``layers`` blocks of width ``width`` (``heads`` heads,
    MLP width ``4 · width``), a final LayerNorm and a linear head over the vocabulary (its
    own weight), no dropout (nanoGPT's default). Logits ``(N, V, T)`` for the loss.
    """

    def __init__(
        self, vocabulary: int, width: int = 32, layers: int = 2, heads: int = 2, length: int = 16
    ):
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "proj": nn.Linear(width, width),
                    "norm2": nn.LayerNorm(width),
                    "up": nn.Linear(width, 4 * width),
                    "down": nn.Linear(4 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(N, V, T)`` of the next token at each position of ``tokens`` ``(N, T)``."""
        n, length = tokens.shape
        x = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).chunk(3, dim=2)
            q, k, v = (z.reshape(n, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["proj"](attended.transpose(1, 2).reshape(n, length, -1))
            x = x + block["down"](nn.functional.gelu(block["up"](block["norm2"](x))))
        return self.head(self.norm(x)).transpose(1, 2)


class TransformerLM(nn.Module):
    """Small causal transformer language model; logits shaped ``(N, V, T)`` for the loss.

    Token and position embeddings, ``layers`` pre-norm-free ``nn.TransformerEncoderLayer``
    blocks (``heads`` heads, feed-forward width ``4 · d_model``, dropout 0.1, causal mask)
    and a linear head over the vocabulary. ``nn.CrossEntropyLoss`` on ``(N, V, T)`` logits
    and ``(N, T)`` targets averages over every position of every sequence.
    """

    def __init__(
        self, vocabulary: int, d_model: int = 128, layers: int = 2, heads: int = 4, length: int = 32
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, d_model)
        self.positions = nn.Embedding(length, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocabulary)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(N, V, T)`` of the next token at each position of ``tokens`` ``(N, T)``."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        hidden = self.encoder(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(hidden).transpose(1, 2)


def resnet18() -> nn.Module:
    """ResNet-18 of torchvision with 10 classes (BatchNorm in train mode while training)."""
    from torchvision.models import resnet18 as build

    return build(num_classes=10)


def mobilenet_v3() -> nn.Module:
    """The torchvision MobileNetV3-Small with 10 classes (squeeze-excitation, hardswish)."""
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=10)


def regnet() -> nn.Module:
    """The torchvision RegNetY-400MF with 10 classes (grouped convolutions, squeeze-excitation)."""
    from torchvision.models import regnet_y_400mf

    return regnet_y_400mf(num_classes=10)


def vision_transformer() -> nn.Module:
    """The torchvision VisionTransformer: 32×32 images, 4×4 patches, 4 layers of width 128."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32,
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        mlp_dim=256,
        num_classes=10,
    )


class UNet(nn.Module):
    """A three-level UNet with skip connections and transposed convolutions: per-pixel logits.

    Returns ``(N, C, H, W)`` logits for ``nn.CrossEntropyLoss`` against ``(N, H, W)`` labels.
    """

    def __init__(self, classes: int = 3, width: int = 16):
        super().__init__()

        def double(fan_in: int, fan_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(fan_in, fan_out, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(fan_out, fan_out, 3, padding=1),
                nn.ReLU(),
            )

        self.down1 = double(3, width)
        self.down2 = double(width, 2 * width)
        self.bottom = double(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.merge2 = double(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.merge1 = double(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits ``(N, C, H, W)``."""
        first = self.down1(x)
        second = self.down2(nn.functional.max_pool2d(first, 2))
        bottom = self.bottom(nn.functional.max_pool2d(second, 2))
        second = self.merge2(torch.cat([second, self.up2(bottom)], dim=1))
        first = self.merge1(torch.cat([first, self.up1(second)], dim=1))
        return self.head(first)


def digits_mlp() -> nn.Module:
    """The examples' MLP on 8×8 digits: 64-128-128-10."""
    return mlp(64, 128, 128, 10)


def digits_cnn() -> nn.Module:
    """The examples' CNN on 8×8 digits (``examples/cnn_block_kron.py``)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
