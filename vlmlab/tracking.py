"""Experiment trackers (`train.report_to=tensorboard,mlflow,trackio`): the scalars of train_log.jsonl, the evaluations
with their shuffled controls and the report's sample grid, sent to TensorBoard, MLflow or Trackio as well; offline by
default.

A tracker is built from the run directory and the resolved config (logged as `section.field` params) and offers
`log(record)` (a train_log.jsonl record), `image(name, png_path, step)` and `close(failed)`. TensorBoard writes event
files to RUN/tensorboard; MLflow a local file store RUN/mlruns unless MLFLOW_TRACKING_URI says otherwise (MLflow 3.x
reads a file store only with MLFLOW_ALLOW_FILE_STORE=true, which the tracker sets for its own; `mlflow ui` needs it
too). Trackio writes to its own local store, one for all runs (project "vlmlab", a run per training named after its
directory): $TRACKIO_DIR, else $HF_HOME/trackio (~/.cache/huggingface/trackio). Trackio fixes that folder when it is
first imported, so it cannot be put inside the run; it goes online only when TRACKIO_SPACE_ID or TRACKIO_SERVER_URL
is set.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import time
from pathlib import Path

from vlmlab.config import Config, ConfigError, flat_fields
from vlmlab.registry import lookup

INSTALL = 'pip install -e ".[tracking]"'


def names(report_to: str) -> list[str]:
    """The trackers `train.report_to` names ("none" or "": none), each checked against the registry."""
    chosen = [name.strip() for name in report_to.split(",") if name.strip()]
    return list(dict.fromkeys(name for name in chosen if lookup(TRACKERS, name, "train.report_to tracker")))


def require(report_to: str) -> None:
    """Raises a one-line ConfigError when a named tracker's package is missing (checked before any step)."""
    for name in names(report_to):
        try:
            importlib.import_module(TRACKERS[name][0])
        except ImportError:
            raise ConfigError(f"train.report_to={name} needs the {PACKAGES[name]} package: {INSTALL}") from None


def flatten(record: dict, prefix: str = "train") -> dict[str, float]:
    """The numeric scalars of a log record by `/`-joined names: top-level values under `prefix` (train/loss),
    nested ones under their key (eval/vqa_accuracy, eval/vqa_accuracy_by_type/color); `step` itself is left out."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in _numbers(value).items()})
        elif _is_number(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _numbers(tree: dict) -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in _numbers(value).items()})
        elif _is_number(value):
            out[str(key)] = float(value)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def params(cfg: Config) -> dict[str, str]:
    """The config as `section.field` -> text."""
    return {key: str(value) for key, value in flat_fields(cfg).items()}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params(cfg).items()), 0)

    def log(self, record: dict) -> None:
        for name, value in flatten(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def image(self, name: str, png_path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(name, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path, cfg: Config):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # offline: a file store in the run; MLflow 3.x asks to opt in to it (a database needs SQLAlchemy)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("vlmlab")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("vlmlab")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
        values = [Param(key, value[:6000]) for key, value in params(cfg).items()]
        for start in range(0, len(values), 100):  # log_batch takes at most 100 params at a time
            self.client.log_batch(self.run_id, params=values[start:start + 100])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * time.time())
        metrics = [Metric(name, value, stamp, record["step"]) for name, value in flatten(record).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def image(self, name: str, png_path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png_path), artifact_path=f"images/{name.rpartition('/')[0]}")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker:
    def __init__(self, run_dir: Path, cfg: Config):
        import trackio

        from vlmlab.log import info

        # Trackio's own chatter (several lines, colours) is dropped for one line of ours. No CPU / GPU monitors: the
        # same scalars as train_log.jsonl, and no sampling threads competing with training.
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(project="vlmlab", name=run_dir.resolve().name, config=params(cfg), embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)
        from trackio.utils import TRACKIO_DIR

        info(f"trackio: run {self.run.name} of project vlmlab in {TRACKIO_DIR} (trackio show --project vlmlab)")

    def log(self, record: dict) -> None:
        self.run.log(flatten(record), step=record["step"])

    def image(self, name: str, png_path: Path, step: int) -> None:
        import trackio

        self.run.log({name: trackio.Image(str(png_path))}, step=step)

    def close(self, failed: bool = False) -> None:
        import trackio
        from trackio import context_vars

        with contextlib.redirect_stdout(io.StringIO()):
            if failed:  # trackio has no run status; an error alert is what its dashboard shows for one
                self.run.alert("run failed", "training stopped with an error; see the run's output",
                               trackio.AlertLevel.ERROR)
            if context_vars.current_run.get() is self.run:
                trackio.finish()  # also forgets it as the current run, which trackio would finish again at exit
            else:
                self.run.finish()


# name -> (module whose import says the package is there, builder)
TRACKERS = {"none": None, "tensorboard": ("tensorboard", TensorBoardTracker), "mlflow": ("mlflow", MlflowTracker),
            "trackio": ("trackio", TrackioTracker)}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow (or mlflow-skinny)", "trackio": "trackio"}


class Trackers:
    """The trackers of one run, used as one; empty (every call a no-op) until `open`."""

    def __init__(self):
        self.trackers = []

    def open(self, run_dir: Path, cfg: Config) -> None:
        self.trackers = [TRACKERS[name][1](Path(run_dir), cfg) for name in names(cfg.train.report_to)]

    def log(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def image(self, name: str, png_path: Path, step: int) -> None:
        for tracker in self.trackers:
            tracker.image(name, Path(png_path), step)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)
