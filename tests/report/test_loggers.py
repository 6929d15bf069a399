"""`fisher-monitor report` from Lightning `CSVLogger` directories and MLflow file stores.

The runs come from real `Trainer.fit`s: a `CSVLogger`, and a logger that writes an MLflow
file store exactly as MLflow's `FileStore` lays it out (`metrics/<key>` files of
"timestamp value step" lines, `params/<key>`, `tags/mlflow.runName`, `meta.yaml`) — the
monitor's own MLflow writer feeds it, as it feeds Lightning's `MLFlowLogger`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pytorch_lightning.loggers import Logger

from fisher_monitor.report.cli import main as cli
from fisher_monitor.report.load import ReportError, load_runs
from fisher_monitor.report.render import write_report
from synthetic import fisher_run


class MLFlowLogger(Logger):  # the monitor picks its MLflow writer by this class name
    """Writes what Lightning's MLFlowLogger hands to MLflow, as MLflow's FileStore does."""

    def __init__(self, root: Path, experiment: str = "digits", run_name: str = "adam-1"):
        super().__init__()
        self.experiment_id = "271828"
        self.run_id = uuid.uuid4().hex
        self.directory = root / self.experiment_id / self.run_id
        (self.directory / "tags").mkdir(parents=True)
        (root / self.experiment_id / "meta.yaml").write_text(
            f"artifact_location: file://{root / self.experiment_id}\nexperiment_id: "
            f"'{self.experiment_id}'\nlifecycle_stage: active\nname: {experiment}\n"
        )
        (self.directory / "meta.yaml").write_text(
            f"run_id: {self.run_id}\nrun_name: {run_name}\nstatus: 1\n"
        )
        (self.directory / "tags" / "mlflow.runName").write_text(run_name)

    @property
    def name(self) -> str:
        return self.experiment_id

    @property
    def version(self) -> str:
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            path = self.directory / "metrics" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as stream:
                stream.write(f"{stamp} {float(value)} {step or 0}\n")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(params).items():
            path = self.directory / "params" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(value)[:250])


def train(logger, steps: int = 12, **monitor):
    from fisher_monitor import FisherMonitor
    from lightning_helpers import fit

    settings = {"every_n_steps": 2, "structures": ("diag", "block"), **monitor}
    fit(FisherMonitor(**settings), steps=steps, logger=logger)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> Path:
    from pytorch_lightning.loggers import CSVLogger

    root = tmp_path_factory.mktemp("csv")
    logger = CSVLogger(root, name="csv")
    train(logger)
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlruns")
    train(MLFlowLogger(root))
    return root


def test_a_csv_logger_run_is_reported(csv_run, tmp_path):
    assert (csv_run / "metrics.csv").is_file() and not list(csv_run.glob("events.*"))
    (run,) = load_runs([csv_run])
    assert run.name == "version_0" and run.prefix == "~fisher"
    assert run.structures == ["diag", "block"] and run.steps == [0, 2, 4, 6, 8, 10]
    # the settings and the dimensions from the hyperparameters the callback logged
    assert run.settings["optimizer"] == "SGD" and run.settings["structures"] == ["diag", "block"]
    assert run.settings["loss"] == "CrossEntropyLoss(reduction='mean', ignore_index=-100)"
    assert run.dimensions["net.0"] == 40 and run.dimensions["all"] == 67
    assert run.has_update_audit
    written = write_report([run], tmp_path / "out")
    document = json.loads(written["json"].read_text())
    (entry,) = document["runs"]
    assert entry["headline"]["text"].startswith("For your SGD training")
    assert {v["topic"] for v in entry["verdicts"]} == {
        "preconditioning",
        "matrix",
        "scale",
        "trace",
        "optimizer",
    }
    assert entry["layers"]["net.0"]["last"]["dimension"] == 40
    assert "direction_cosine" in written["html"].read_text()


def test_the_csv_run_through_the_command_line(csv_run, tmp_path, capsys):
    assert cli(["report", str(csv_run.parent), "-o", str(tmp_path / "r"), "-q"]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert cli(["summary", str(csv_run), "-q", "--use", "laplace"]) == 0
    out = capsys.readouterr().out
    assert "in short: For a Laplace approximation" in out and "[" in out


def test_an_mlflow_file_store_is_reported(mlflow_store, tmp_path):
    (run,) = load_runs([mlflow_store])  # the store, an experiment or a run alike
    assert run.name == "digits/adam-1" and run.prefix == "fisher"  # MLflow refuses "~"
    assert run.structures == ["diag", "block"] and run.steps == [0, 2, 4, 6, 8, 10]
    assert run.settings["optimizer"] == "SGD" and run.settings["audit"] is True
    assert run.dimensions["net.3"] == 27
    (experiment,) = [p for p in mlflow_store.iterdir() if p.is_dir()]
    (directory,) = [p for p in experiment.iterdir() if p.is_dir()]
    for path in (experiment, directory):
        (again,) = load_runs([path])
        assert again.scalars.keys() == run.scalars.keys()
    written = write_report([run], tmp_path / "out", ["json"])
    (entry,) = json.loads(written["json"].read_text())["runs"]
    assert entry["headline"]["topic"] == "headline" and len(entry["verdicts"]) == 5


def test_a_hand_written_mlflow_run_and_its_format(tmp_path):
    """The file store as MLflow writes it: "timestamp value step" lines; NaN left out."""
    run_dir = tmp_path / "mlruns" / "0" / "abc123"
    metrics = run_dir / "metrics" / "fisher" / "block"
    for name, values in {"direction_cosine": 0.3, "trace_ratio": 1.0, "rel_error": 0.9}.items():
        (metrics / name).mkdir(parents=True)
        lines = [f"17000000{s} {values} {s}" for s in range(0, 60, 10)]
        lines.append("1700000099 nan 70")
        (metrics / name / "all").write_text("\n".join(lines) + "\n")
    (run_dir / "params" / "fisher").mkdir(parents=True)
    (run_dir / "params" / "fisher" / "optimizer").write_text("AdamW")
    (run_dir / "params" / "fisher" / "preconditioner").write_text("True")
    (run_dir / "params" / "fisher" / "structures").write_text("block")
    (run_dir / "meta.yaml").write_text("run_id: abc123\n")
    (run,) = load_runs([tmp_path / "mlruns"])
    assert run.steps == [0, 10, 20, 30, 40, 50]  # the NaN at step 70 is not a value
    assert run.settings["optimizer"] == "AdamW" and run.settings["preconditioner"] is True
    (run_dir / "metrics" / "fisher" / "block" / "rel_error" / "all").write_text("1 2\n")
    with pytest.raises(ReportError, match=r"is not 'timestamp value step'"):
        load_runs([run_dir], strict=True)


def test_loggers_side_by_side_and_in_one_directory(csv_run, mlflow_store, tmp_path):
    tensorboard = fisher_run(tmp_path / "tb" / "version_0")
    runs = load_runs([tensorboard.parent, csv_run, mlflow_store])
    assert sorted(run.prefix for run in runs) == ["fisher", "fisher", "~fisher"]
    # Lightning's loggers may share a version directory: the event files are read there
    (tensorboard / "metrics.csv").write_text((csv_run / "metrics.csv").read_text())
    (only,) = load_runs([tensorboard])
    assert only.prefix == "fisher" and only.path == tensorboard


def test_bad_logger_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["summary", str(empty), "-q"]) == 2
    error = capsys.readouterr().err
    assert "no TensorBoard event files found, nor a CSVLogger metrics.csv or an MLflow run" in (
        error
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="no 'step' column"):
        load_runs([broken])
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text("step,train_loss\n0,1.0\n")
    with pytest.raises(ReportError, match="no fisher-monitor data"):
        load_runs([other])
    bad_cell = tmp_path / "cell" / "version_0"
    bad_cell.mkdir(parents=True)
    (bad_cell / "metrics.csv").write_text("step,~fisher/block/trace_ratio/all\n0,oops\n")
    with pytest.raises(ReportError, match=r"'oops' is not a number"):
        load_runs([bad_cell], strict=True)
