"""LightningModules that compute their loss the way users write it, with their data.

Each computes the loss in ``training_step`` (or lets a Hugging Face model compute it) and
holds no loss module, so that ``FisherMonitor()`` must find the loss by recording a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tiny_transformers import CausalBlock as Block

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, LENGTH = 13, 6


class TinyGPT(nn.Module):
    """Embedding → 2 causal blocks → LayerNorm → Linear head (untied): ``(N, T, V)`` logits."""

    def __init__(self, vocab: int = VOCAB, width: int = 8, length: int = LENGTH):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(t, device=input_ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = (
            causal if attention_mask is None else causal & attention_mask[:, None, None, :].bool()
        )
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class CausalLM(pl.LightningModule):
    """A causal LM trained with the shift written out in ``training_step``."""

    def __init__(self, model: nn.Module | None = None, lr: float = 0.1):
        super().__init__()
        self.model = model if model is not None else TinyGPT()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(logits, "logits", logits)
        vocab = logits.shape[-1]
        targets = batch["input_ids"][:, 1:].reshape(-1)
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class HFLabels(CausalLM):
    """Lets the Hugging Face model compute its own (shifted, padded) loss from ``labels=``."""

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


class Tokens(Dataset):
    """Random token sequences as dicts; the last positions of some are padding."""

    def __init__(self, n: int = 32, vocab: int = VOCAB, length: int = LENGTH, labels=False):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -2:] = 0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[index], "attention_mask": self.mask[index]}
        if self.labels:
            item["labels"] = self.ids[index].masked_fill(self.mask[index] == 0, -100)
        return item


def tokens(batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(Tokens(**kwargs), batch_size=batch_size)


def tiny_gpt2(vocab: int = VOCAB):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,  # no dropout: the first measurement is compared with measure()
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # tied weights are handled elsewhere (issue 20)
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(classes: int = 3, vocab: int = VOCAB):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class Sentences(Tokens):
    """Token sequences with a class label per sequence, as ``labels``."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        item["labels"] = self.ids[index, 0] % 3
        return item


class BertClassifier(pl.LightningModule):
    """A BERT-style classifier: the batch goes in as keyword arguments, HF computes the loss."""

    def __init__(self):
        super().__init__()
        self.model = tiny_bert()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BertLogits(BertClassifier):
    """The same classifier with the cross-entropy on ``out.logits`` in ``training_step``."""

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["labels"])


@dataclass
class Output:
    """What many models return: an object holding the logits and more."""

    logits: torch.Tensor
    features: torch.Tensor


class ObjectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return Output(self.head(features), features)


class ObjectClassifier(pl.LightningModule):
    """A classifier whose network returns an object with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.net = ObjectNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self(inputs).logits, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoHeads(pl.LightningModule):
    """A classification head and a regression head, two losses, no loss module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.classes, self.value = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return self.classes(features), self.value(features)

    def training_step(self, batch, batch_idx):
        logits, value = self(batch[0])
        regression = F.mse_loss(value.squeeze(1), batch[0][:, 0])
        return F.cross_entropy(logits, batch[1]) + regression

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
