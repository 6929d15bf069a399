"""How far does each optimizer's step point from the natural gradient? An audit of three.

The same MLP (64-32-10, tanh) learns scikit-learn's 8×8 digits three times, with

- SGD with momentum 0.9;
- Adam;
- a diagonal natural gradient written below: θ ← θ − η (f̂ + λ)⁻¹ ∇L per layer, where f̂
  is an exponential average of B·ĝ_MC², the squared gradient of the mini-batch loss at
  labels sampled from the model. With sampled labels the mini-batch gradient has mean
  zero, so E[ĝ_MC ĝ_MCᵀ] = F/B exactly (the batch-size relation with g = 0) and B·ĝ_MC² is
  an unbiased estimate of diag F. λ = δ · mean(f̂) per layer, the same relative damping
  the monitor uses.

``FisherMonitor`` audits each run: at every measured step it compares the update the
optimizer really applied (parameters after ``optimizer.step()`` minus before) with the
damped natural-gradient step −(F + λI)⁻¹g and the EF step −(EF + λI)⁻¹g of the training
batch, for the diagonal and the per-layer (block) restriction, and for Adam it compares
the preconditioner √v̂ + ε with √diag F and √diag EF. The monitor's damping is the
natural-gradient optimizer's δ, so "the natural gradient" is the same damped one for
both. The figure shows the cosines over training, Adam's preconditioner cosines, and the
training loss. At the end, Adam's preconditioner is compared once more on the whole
training set (a steadier diag F and diag EF than a 64-sample batch), together with the
expected squared mini-batch gradient E[g_B²] = g² + (diag EF − g²)/B that Adam's v̂
actually averages.

Expected picture (12 epochs, 24 measurements per optimizer; medians over training):

- the diagonal natural gradient follows the diagonal natural-gradient step best
  (cosine 0.57, against 0.27 for Adam and 0.19 for SGD), although its curvature is an
  average over the last ~20 steps of one sampled label per input; yet it follows the
  per-layer natural-gradient step *least* (0.12, against 0.23 and 0.26): a diagonal
  curvature model does not bring a step closer to the natural gradient of the full
  layer, whose off-diagonal curvature turns the direction;
- SGD's and Adam's steps are closer to the EF step than to the natural-gradient step,
  for both restrictions (diagonal 0.24 and 0.34 against 0.19 and 0.27; per layer 0.30
  and 0.34 against 0.26 and 0.23);
- Adam's preconditioner √v̂ + ε correlates with √diag F (0.90 on the 64-sample training
  batches) more than with √diag EF (0.84). On the whole training set (diag F and diag EF
  nearly coincide there, cosine 0.98) the three cosines are close: 0.94 with √diag F,
  0.92 with √diag EF, 0.93 with √E[g_B²]. The small probe's EF is the noisier estimate;
  Adam's curvature estimate is not what keeps its steps from the natural gradient — the
  square root, the momentum and the diagonal structure are.

Runs in a few minutes on two CPU cores (``--fast``: 12 steps per optimizer, for tests).

    python examples/optimizer_audit.py [--fast]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DigitsClassifier, digits, fast_mode, loaders, output_dir, quiet  # noqa: E402

from fisher_monitor import FisherMonitor, measure  # noqa: E402
from fisher_monitor.audit import minibatch_second_moment, preconditioner_audit  # noqa: E402
from fisher_monitor.report import load_runs  # noqa: E402

#: Relative damping δ of the natural-gradient optimizer and of the monitor.
DAMPING = 1e-2
BATCH_SIZE = 64
OPTIMIZERS = {
    "SGD (momentum 0.9)": {"lr": 0.05},
    "Adam": {"lr": 3e-3},
    "diagonal natural gradient": {"lr": 1e-2},
}
COLORS = {"SGD (momentum 0.9)": "C0", "Adam": "C1", "diagonal natural gradient": "C2"}


class DiagonalNaturalGradient(torch.optim.Optimizer):
    """θ ← θ − η (f̂ + λ)⁻¹ g: a damped diagonal natural gradient with a sampled Fisher.

    ``f̂`` is the bias-corrected exponential average (rate ``beta``) of ``B · ĝ_MC²``,
    given by :meth:`accumulate` before each step, and ``λ = damping · mean(f̂)`` over the
    parameters of a group (give one group per layer). No momentum, no weight decay.
    The state key ``fisher_diag`` is not one the preconditioner audit recognises (it is
    no second moment of the gradient), so only the step audit applies.
    """

    def __init__(self, params, lr: float = 1e-2, damping: float = 1e-2, beta: float = 0.95):
        super().__init__(params, {"lr": lr, "damping": damping, "beta": beta})

    @torch.no_grad()
    def accumulate(self, sampled_gradients, batch_size: int) -> None:
        """Add ``B · ĝ_MC²`` of the parameters (in ``param_groups`` order) to f̂."""
        parameters = [p for group in self.param_groups for p in group["params"]]
        for parameter, gradient in zip(parameters, sampled_gradients, strict=True):
            group = next(g for g in self.param_groups if any(p is parameter for p in g["params"]))
            state = self.state[parameter]
            if "fisher_diag" not in state:
                state["fisher_diag"] = torch.zeros_like(parameter)
                state["count"] = 0
            state["count"] += 1
            state["fisher_diag"].mul_(group["beta"]).addcmul_(
                gradient, gradient, value=(1 - group["beta"]) * batch_size
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning runs training_step (and accumulate) in here
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fisher = [
                self.state[p]["fisher_diag"] / (1 - group["beta"] ** self.state[p]["count"])
                for p in group["params"]
            ]
            damping = group["damping"] * torch.cat([f.reshape(-1) for f in fisher]).mean()
            for parameter, diagonal in zip(group["params"], fisher, strict=True):
                parameter.add_(parameter.grad / (diagonal + damping), alpha=-group["lr"])
        return loss


class AuditedClassifier(DigitsClassifier):
    """The digits MLP with a chosen optimizer; records its training loss per step."""

    def __init__(self, optimizer: str, lr: float, hidden: int = 32):
        net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        super().__init__(net=net, lr=lr)
        self.optimizer_name = optimizer
        self.losses: list[float] = []
        self.label_generator = torch.Generator().manual_seed(0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        if self.optimizer_name == "diagonal natural gradient":
            probabilities = logits.detach().softmax(dim=1)
            sampled = torch.multinomial(probabilities, 1, generator=self.label_generator)[:, 0]
            gradients = torch.autograd.grad(
                self.loss_fn(logits, sampled), list(self.net.parameters()), retain_graph=True
            )
            self.optimizers().optimizer.accumulate(gradients, batch_size=x.shape[0])
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "Adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name.startswith("SGD"):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        layers = [
            {"params": list(self.net[0].parameters())},
            {"params": list(self.net[2].parameters())},
        ]
        return DiagonalNaturalGradient(layers, lr=self.lr, damping=DAMPING)


def train(
    name: str, lr: float, epochs: int, every: int, root: Path, batches: int | None = None
) -> dict:
    torch.manual_seed(0)
    train_set, val_set = digits()
    train_loader, val_loader = loaders(train_set, val_set, batch_size=BATCH_SIZE)
    model = AuditedClassifier(name, lr)
    logger = TensorBoardLogger(root, name=name.split(" ")[0].lower(), version=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[
            FisherMonitor(every_n_steps=every, structures=("diag", "block"), damping=DAMPING)
        ],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=every,
        limit_train_batches=batches,
    )
    trainer.fit(model, train_loader, val_loader)
    (run,) = load_runs([Path(logger.log_dir)])
    result = {
        "run": run,
        "losses": model.losses,
        "accuracy": float(trainer.callback_metrics["val/accuracy"]),
        "seconds": float(np.sum(run.scalars["probe/seconds"][1])),
    }
    if name == "Adam":  # Adam's preconditioner against the whole training set's diagonals
        x, y = train_set.tensors
        measurement = measure(model.net, model.loss_fn, x, y, structures=("diag",))
        parameters = {f"{n}": p for n, p in model.net.named_parameters()}
        optimizer = trainer.optimizers[0]
        audit = preconditioner_audit(optimizer, parameters, measurement)
        denominator = torch.cat([audit.denominators[layer] for layer in measurement.layer_names])
        fisher, empirical, gradient = (
            torch.cat([part[layer] for layer in measurement.layer_names])
            for part in (
                {k: v[0] for k, v in measurement.diagonals.items()},
                {k: v[1] for k, v in measurement.diagonals.items()},
                {k: v.cpu() for k, v in measurement.gradient.items()},
            )
        )
        moment = minibatch_second_moment(empirical, gradient, BATCH_SIZE, population=len(x))
        result["full_set"] = {
            "fisher": cosine(denominator, fisher.sqrt()),
            "ef": cosine(denominator, empirical.sqrt()),
            "minibatch": cosine(denominator, moment.sqrt()),
            "fisher_vs_ef": cosine(fisher.sqrt(), empirical.sqrt()),
        }
    return result


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def median(run, key: str) -> float:
    return float(np.median(run.scalars[key][1])) if key in run.scalars else float("nan")


def draw(results: dict, root: Path) -> Path:
    """The figure: update cosines (diag, block), Adam's preconditioner, the training loss."""
    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    (diag_axis, block_axis), (adam_axis, loss_axis) = figure.subplots(2, 2)
    for name, result in results.items():
        run, color = result["run"], COLORS[name]
        for axis, structure in ((diag_axis, "diag"), (block_axis, "block")):
            steps, values = run.scalars[f"{structure}/update_nat_cosine/all"]
            axis.plot(steps, values, color=color, marker=".")
            steps, values = run.scalars[f"{structure}/update_ef_cosine/all"]
            axis.plot(steps, values, color=color, linestyle="--", alpha=0.6)
        loss_axis.plot(
            np.convolve(result["losses"], np.ones(8) / 8, mode="valid"), color=color, label=name
        )
    for axis, matrix in ((diag_axis, "diag F + λI"), (block_axis, "F_b + λI per layer")):
        axis.set_title(f"applied update against the steps with {matrix}")
        axis.set_xlabel("step")
        axis.set_ylim(-0.1, 1.0)
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.plot([], [], color="black", marker=".", label="cos(Δθ, natural-gradient step)")
        axis.plot([], [], color="black", linestyle="--", alpha=0.6, label="cos(Δθ, EF step)")
        axis.legend(loc="upper right", fontsize=9)
    diag_axis.set_ylabel("cosine")
    adam = results["Adam"]["run"]
    for which, label in (("fisher", "√diag F"), ("ef", "√diag EF")):
        steps, values = adam.scalars[f"optimizer/preconditioner_{which}_cosine/all"]
        adam_axis.plot(steps, values, marker=".", label=f"cos(√v̂ + ε, {label})")
    adam_axis.set_xlabel("step")
    adam_axis.set_title("Adam's preconditioner against the batch's diagonals")
    adam_axis.set_ylabel("cosine")
    adam_axis.legend()
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss (8-step average)")
    loss_axis.set_yscale("log")
    loss_axis.set_title("training loss")
    loss_axis.legend()
    out = root / "optimizer_audit.png"
    FigureCanvasAgg(figure).print_png(out)
    return out


def summarise(results: dict, out: Path) -> dict:
    """Print and return the headline numbers of each optimizer and of Adam's preconditioner."""
    summary: dict = {"figure": out, "optimizers": {}}
    print(f"figure: {out}  (damping δ = {DAMPING} for the monitor and the natural gradient)")
    for name, result in results.items():
        run = result["run"]
        numbers = {
            "diag_nat": median(run, "diag/update_nat_cosine/all"),
            "block_nat": median(run, "block/update_nat_cosine/all"),
            "diag_ef": median(run, "diag/update_ef_cosine/all"),
            "block_ef": median(run, "block/update_ef_cosine/all"),
            "grad": median(run, "diag/update_grad_cosine/all"),
            "preconditioner_fisher": median(run, "optimizer/preconditioner_fisher_cosine/all"),
            "measurements": len(run.scalars["diag/update_nat_cosine/all"][0]),
            "accuracy": result["accuracy"],
        }
        summary["optimizers"][name] = numbers
        print(
            f"{name:>26}: median update_nat_cosine diag {numbers['diag_nat']:.2f} block "
            f"{numbers['block_nat']:.2f}; update_ef_cosine diag {numbers['diag_ef']:.2f} "
            f"block {numbers['block_ef']:.2f}; update_grad_cosine {numbers['grad']:.2f} "
            f"({numbers['measurements']} measurements, val accuracy {numbers['accuracy']:.3f})"
        )
    adam_run, full = results["Adam"]["run"], results["Adam"]["full_set"]
    summary["adam_preconditioner"] = {
        "fisher": median(adam_run, "optimizer/preconditioner_fisher_cosine/all"),
        "ef": median(adam_run, "optimizer/preconditioner_ef_cosine/all"),
        "full_set": full,
    }
    print(
        "Adam's preconditioner √v̂ + ε, median over training (probe = training batch): cosine "
        f"with √diag F {summary['adam_preconditioner']['fisher']:.3f}, with √diag EF "
        f"{summary['adam_preconditioner']['ef']:.3f}"
    )
    print(
        f"  after training, on the whole training set: √diag F {full['fisher']:.3f}, √diag EF "
        f"{full['ef']:.3f}, √E[g_B²] (B = {BATCH_SIZE}) {full['minibatch']:.3f}; "
        f"cos(√diag F, √diag EF) = {full['fisher_vs_ef']:.3f}"
    )
    return summary


def main(fast: bool = False, root: Path | None = None) -> dict:
    """Train with each optimizer, draw the figure, print and return the headline numbers.

    ``root``: where the logs and the figure go (default ``examples/output/optimizer_audit``).
    """
    quiet()
    epochs, every, batches = (1, 4, 12) if fast else (12, 12, None)
    root = Path(root) if root else output_dir("optimizer_audit")
    shutil.rmtree(root / "runs", ignore_errors=True)  # a fresh log per run of the script
    results = {
        name: train(name, settings["lr"], epochs, every, root / "runs", batches)
        for name, settings in OPTIMIZERS.items()
    }
    return summarise(results, draw(results, root))


if __name__ == "__main__":
    main(fast=fast_mode())
