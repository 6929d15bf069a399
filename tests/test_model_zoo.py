"""The models users train, measured by ``FisherMonitor()`` in a real ``Trainer.fit``.

Tiny configurations with random weights (nothing is downloaded): torchvision's
MobileNetV3, a RegNet and a VisionTransformer, a UNet with per-pixel cross-entropy,
Hugging Face's BERT classifier with attention masks, and GPT-style language models with
tied embeddings (one hand-built, trained with ``F.cross_entropy`` in ``training_step`` on
dict batches; Hugging Face's GPT-2 as it configures it). BackPACK cannot follow any of
them; the autograd backend measures them. Every headline metric must be logged with
``FisherMonitor()``'s defaults, and the vision transformer, the UNet and the language
model (in float64) must equal the brute-force definitions of :mod:`reference`.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import reference
from fisher_monitor import FisherMonitor, measure
from fisher_monitor.schedules import budget
from lightning_helpers import SpyLogger, trainer_kwargs
from reference_checks import assert_matches
from tiny_transformers import CausalBlock

torchvision = pytest.importorskip("torchvision")

HEADLINE = ("direction_cosine", "nat_grad_cosine", "kl", "nat_projection")


def headline_keys(structure: str = "block") -> list[str]:
    return [f"~fisher/{structure}/{metric}/all" for metric in HEADLINE]


class Classifier(pl.LightningModule):
    """A model of the zoo with its loss as an attribute, trained with SGD."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return self.loss_fn(self(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(module: pl.LightningModule, data: DataLoader, monitor: FisherMonitor, steps: int = 2):
    logger = SpyLogger()
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return logger


def images(channels: int = 3, size: int = 32, classes: int = 5, n: int = 8, per_pixel=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=generator)
    shape = (n, size, size) if per_pixel else (n,)
    y = torch.randint(0, classes, shape, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def mobilenet() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(num_classes=5, width_mult=0.25)


def regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(
        depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25
    )
    return RegNet(params, num_classes=5)


def vision_transformer(size: int = 16, width: int = 8) -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=size,
        patch_size=size // 2,
        num_layers=1,
        num_heads=2,
        hidden_dim=width,
        mlp_dim=2 * width,
        num_classes=5,
    )


class UNet(nn.Module):
    """Two levels, a skip connection, a transposed convolution: per-pixel logits (N, C, H, W)."""

    def __init__(self, classes: int = 3, width: int = 4):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Conv2d(2 * width, classes, 1)

    def forward(self, x):
        skip = self.down(x)
        bottom = self.bottom(F.max_pool2d(skip, 2))
        return self.head(torch.cat([skip, self.up(bottom)], dim=1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "data"),
    [
        (mobilenet, lambda: images()),
        (regnet, lambda: images()),
        (vision_transformer, lambda: images(size=16)),
        (UNet, lambda: images(size=8, classes=3, per_pixel=True)),
    ],
    ids=["mobilenet_v3", "regnet", "vit", "unet"],
)
def test_vision_models_log_every_headline_metric(make, data):
    torch.manual_seed(0)
    monitor = FisherMonitor()
    logger = fit(Classifier(make()), data(), monitor)
    for key in headline_keys():
        assert logger.steps_with(key), f"{key} was never logged"
    coverage = monitor.last_measurement.coverage
    assert {entry["backend"] for entry in coverage} == {"autograd"}
    assert all(entry["measured"] for entry in coverage)


def small_vision_transformer() -> nn.Module:
    return vision_transformer(size=8, width=4)


@pytest.mark.parametrize("make", [small_vision_transformer, UNet], ids=["vit", "unet"])
@pytest.mark.slow
def test_vision_models_match_the_reference_in_float64(make):
    torch.manual_seed(1)
    model = make().double().eval()
    if make is small_vision_transformer:  # torchvision starts the head at zero
        nn.init.normal_(model.heads.head.weight, std=0.5)
    size, per_pixel = (8, False) if make is small_vision_transformer else (4, True)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    classes = 5 if make is small_vision_transformer else 3
    y = torch.randint(0, classes, (3, size, size) if per_pixel else (3,))
    loss = nn.CrossEntropyLoss()
    m = measure(model, loss, x, y, damping=[1e-3, 1e-1])
    assert {entry["backend"] for entry in m.coverage} == {"autograd"}
    expected = reference.diag_and_block_metrics(model, loss, x, y, [1e-3, 1e-1])
    assert_matches(m.scalars, expected)


def bert(classes: int = 3):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class TextClassifier(pl.LightningModule):
    """A Hugging Face classifier on dict batches with attention masks; the loss is written
    in ``training_step`` as users write it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TextData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 6):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 30, (n, length), generator=generator)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::2, length // 2 :] = 0  # padded sentences
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


@pytest.mark.slow
def test_bert_classifier_with_attention_masks_logs_every_headline_metric():
    torch.manual_seed(0)
    monitor = FisherMonitor()
    logger = fit(TextClassifier(bert()), DataLoader(TextData(), batch_size=4), monitor)
    for key in headline_keys():
        assert logger.steps_with(key), f"{key} was never logged"
    assert {e["backend"] for e in monitor.last_measurement.coverage} == {"autograd"}


def test_bert_classifier_matches_torch_func_in_float64():
    """The keyword inputs and the ``ModelOutput`` through both backends: the same numbers
    (the torch.func backend is itself checked against the reference)."""
    torch.manual_seed(2)
    model = bert().double().eval()
    data = TextData(n=4)
    inputs = {"input_ids": data.ids, "attention_mask": data.mask}
    ours = measure(model, "cross_entropy", inputs, data.labels)
    theirs = measure(model, "cross_entropy", inputs, data.labels, backend="functorch")
    assert {entry["backend"] for entry in ours.coverage} == {"autograd"}
    expected = {k: v for k, v in theirs.scalars.items() if not k.startswith("probe/sec")}
    assert_matches(ours.scalars, expected, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------- language models


class TiedGPT(nn.Module):
    """Token and position embeddings, causal blocks, a LayerNorm and an output layer whose
    weight is the token embedding's (tied, as GPT-2 ties them)."""

    def __init__(self, vocab: int = 23, width: int = 8, length: int = 6, layers: int = 2):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList([CausalBlock(width) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(t, device=input_ids.device))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class LanguageModel(pl.LightningModule):
    """The causal LM as users write it: dict batches, the shift and ``F.cross_entropy``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(logits, "logits", logits)
        vocab = logits.shape[-1]
        targets = batch["input_ids"][:, 1:].reshape(-1)
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences as dicts; every third one ends in two padding positions."""

    def __init__(self, n: int = 8, vocab: int = 23, length: int = 6, padded: bool = True):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.mask = torch.ones(n, length, dtype=torch.long)
        if padded:
            self.mask[::3, -2:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


@pytest.mark.slow
def test_tied_gpt_with_functional_loss_on_dict_batches_logs_every_headline_metric():
    torch.manual_seed(0)
    monitor = FisherMonitor()
    logger = fit(LanguageModel(TiedGPT()), DataLoader(Tokens(), batch_size=4), monitor)
    for key in headline_keys():
        assert logger.steps_with(key), f"{key} was never logged"
    coverage = {entry["layer"]: entry for entry in monitor.last_measurement.coverage}
    assert "head" not in coverage and coverage["embed"]["measured"]  # one tied layer
    assert {entry["backend"] for entry in coverage.values()} == {"autograd"}
    assert any(note.startswith("loss found") for note in monitor._info.notes)


class Shifted(nn.Module):
    """The loss's input per sample, ``(N, V, T − 1)``, for the reference."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)[:, :-1].transpose(1, 2)


@pytest.mark.slow
def test_tied_gpt_first_measurement_matches_the_reference_in_float64():
    """A float64 fit's first measurement equals F and EF from their definitions, with the
    tied embedding one layer whose gradient sums both uses."""
    torch.manual_seed(0)
    model = TiedGPT(vocab=7, width=4, length=4, layers=1)
    initial = Shifted(copy.deepcopy(model)).double()
    data = DataLoader(Tokens(n=4, vocab=7, length=4, padded=False), batch_size=4)
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True)
    logger = SpyLogger()
    trainer = pl.Trainer(
        max_steps=1, logger=logger, callbacks=[monitor], **trainer_kwargs(precision="64-true")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LanguageModel(model), data)
    ids = next(iter(data))["input_ids"]
    expected = reference.diag_and_block_metrics(initial, nn.CrossEntropyLoss(), ids, ids[:, 1:])
    logged = {
        key[len("~fisher/") :]: value
        for step, metrics in logger.calls
        if step == 0
        for key, value in metrics.items()
    }
    renamed = {key.replace("/lm.", "/"): value for key, value in expected.items()}
    assert_matches(logged, {k: v for k, v in renamed.items() if "/dimension/" not in k})


def gpt2(vocab: int = 23):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as configured
    return model


@pytest.mark.slow
def test_hugging_face_gpt2_as_configured_logs_every_headline_metric():
    """GPT-2 with its tied head and its own loss from ``labels=``."""

    class HFLanguageModel(LanguageModel):
        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

    class Labelled(Tokens):  # as DataCollatorForLanguageModeling(mlm=False) batches them
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {
                **item,
                "labels": item["input_ids"].masked_fill(item["attention_mask"] == 0, -100),
            }

    torch.manual_seed(0)
    monitor = FisherMonitor()
    logger = fit(HFLanguageModel(gpt2()), DataLoader(Labelled(), batch_size=4), monitor)
    for key in headline_keys():
        assert logger.steps_with(key), f"{key} was never logged"
    coverage = {entry["layer"]: entry for entry in monitor.last_measurement.coverage}
    assert "lm_head" not in coverage and coverage["transformer.wte"]["measured"]


# ------------------------------------------- a language model over a vocabulary of 200


def gpt_over_200_tokens(tied: bool) -> LanguageModel:
    """A GPT-style LM of one block, width 16, over 200 tokens (its head untied on request)."""
    torch.manual_seed(0)
    model = TiedGPT(vocab=200, width=16, length=6, layers=1)
    if not tied:
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    return LanguageModel(model)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_over_200_tokens_logs_every_headline_metric_with_the_defaults(tied):
    """``FisherMonitor()`` as it comes: every headline metric of ``block`` is logged."""
    monitor = FisherMonitor()
    data = DataLoader(Tokens(n=4, vocab=200, length=6), batch_size=2)
    logger = fit(gpt_over_200_tokens(tied), data, monitor)
    for key in headline_keys():
        assert logger.steps_with(key), f"{key} was never logged"


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_under_a_sketch_logs_the_fisher_inverse_metrics_from_exact_solves(tied):
    """Under a sketch (what large vocabularies get) the four Fisher-inverse metrics of
    ``block`` come from the exact Fisher's matrix-free solves at every measurement: the
    solves' time is charged to the budget schedule with the rest of the measurement, which
    spaces the next measurement by it (``budget`` waits for ``last_cost``) rather than
    dropping the metrics."""
    monitor = FisherMonitor(estimator="sketch", schedule=budget(0.05, minimum=2))
    data = DataLoader(Tokens(n=4, vocab=200, length=6), batch_size=2)
    logger = fit(gpt_over_200_tokens(tied), data, monitor, steps=3)
    measured = logger.steps_with("~fisher/block/trace_ratio/all")
    assert len(measured) >= 2  # the guaranteed ones at least
    for key in headline_keys():
        assert logger.steps_with(key) == measured, key  # at every measurement
    last = monitor.last_measurement
    solves = last.settings["estimator"]["exact_solves"]
    assert solves["layers"] == len(last.layer_names)
    assert any("by matrix-free solves" in note for note in last.notes)
    assert monitor.schedule.last_cost >= solves["seconds"]
