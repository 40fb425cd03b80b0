"""`train.report_to`: TensorBoard, MLflow and Trackio get train_log.jsonl's scalars at their steps, the evaluations
with their shuffled controls and the sample grid; an unknown name or a missing package is one error line before any
step."""

import atexit
import json
import os
import shutil
import socket
import sys
import tempfile

import pytest

from vlmlab.cli import main
from vlmlab.config import Config, ConfigError, apply_overrides
from vlmlab.test_model import SMALL
from vlmlab.tracking import Trackers, flatten

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

# Trackio fixes its store folder when first imported (TRACKIO_DIR, else ~/.cache/huggingface/trackio): a temporary one
# is set before that, so that the tests never write into the user's store.
TRACKIO_READY = "trackio" not in sys.modules
if TRACKIO_READY:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="vlmlab-test-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], True)  # after trackio's own exit handlers (LIFO)

RUN = [*SMALL, "data.train_images=6", "data.eval_images=3", "train.batch_size=6", "train.max_steps=4",
       "train.log_every=1", "train.eval_every=2", "train.eval_examples=8", "train.alarm_every=0",
       "train.warmup_steps=1", "train.save_every=0", "eval.caption_metrics=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")  # recorded, so that undo removes what the tracker sets
    mp.delenv("MLFLOW_ALLOW_FILE_STORE")  # the tracker opts in to its own file store
    try:
        assert main(["train", "--out", str(out), *RUN, "train.report_to=tensorboard,mlflow"]) == 0
    finally:
        mp.undo()
    return out


def losses(run):
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_tensorboard_holds_the_log_the_evaluations_and_the_sample_grid(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses(run))
    assert [e.step for e in events.Scalars("eval/vqa_accuracy")] == [2]
    assert "eval/vqa_accuracy_shuffled_images" in tags and "train/lr" in tags
    metrics = json.loads((run / "metrics.json").read_text())
    assert {f"test/vqa_accuracy_by_type/{kind}" for kind in metrics["vqa_accuracy_by_type"]} <= set(tags)
    (test,) = events.Scalars("test/vqa_accuracy_shuffled_images")
    assert (test.step, test.value) == (4, pytest.approx(metrics["vqa_accuracy_shuffled_images"]))
    assert events.Tags()["images"] == ["report/samples"]


def test_mlflow_holds_the_log_and_the_config(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x: a file store only on request

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses(run))
    assert found.data.params["train.max_steps"] == "4"
    assert "eval/vqa_accuracy_shuffled_images" in found.data.metrics and found.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(found.info.run_id, "images/report")] == [
        "images/report/samples.png"]


def test_a_failing_run_closes_its_trackers(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import vlmlab.train

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vlmlab.train, "save_checkpoint", broken)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="disk full"):
        vlmlab.train.train(apply_overrides(Config(), [*RUN, "train.max_steps=1", "train.eval_every=0",
                                                       "train.report_to=mlflow"]), tmp_path)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    assert found.info.status == "FAILED" and "train/loss" in found.data.metrics


@pytest.fixture
def trackio_store(monkeypatch):
    """Trackio's store, read back through trackio; every connection to another machine refused and recorded."""
    pytest.importorskip("trackio")
    if not TRACKIO_READY:
        pytest.skip("trackio was imported before its store could be pointed at a temporary folder")
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    tried = []
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"no network in tests: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    from trackio.sqlite_storage import SQLiteStorage

    yield SQLiteStorage, tried
    assert tried == []  # offline: nothing reached for the network


def trackio_runs(storage, run_dir):
    """The ids of trackio's runs named after `run_dir`, oldest first."""
    return [r["id"] for r in storage.get_run_records("vlmlab") if r["name"] == run_dir.resolve().name]


def test_trackio_holds_the_log_the_evaluations_the_config_and_the_sample_grid(trackio_store, tmp_path):
    storage, _ = trackio_store
    out = tmp_path / "trackio-run"
    assert main(["train", "--out", str(out), *RUN, "train.report_to=trackio"]) == 0
    (run_id,) = trackio_runs(storage, out)
    logs = storage.get_logs("vlmlab", run_id=run_id)
    assert {r["step"]: r["train/loss"] for r in logs if "train/loss" in r} == pytest.approx(losses(out))
    assert [r["step"] for r in logs if "eval/vqa_accuracy" in r] == [2]
    assert all("eval/vqa_accuracy_shuffled_images" in r for r in logs if "eval/vqa_accuracy" in r)
    metrics = json.loads((out / "metrics.json").read_text())
    (test,) = [r for r in logs if "test/vqa_accuracy_shuffled_images" in r]
    assert (test["step"], test["test/vqa_accuracy_shuffled_images"]) == (
        4, pytest.approx(metrics["vqa_accuracy_shuffled_images"]))
    assert {f"test/vqa_accuracy_by_type/{kind}" for kind in metrics["vqa_accuracy_by_type"]} <= set(test)
    (grid,) = [r for r in logs if "report/samples" in r]
    assert grid["step"] == 4 and grid["report/samples"]["_type"] == "trackio.image"
    from trackio.utils import MEDIA_DIR

    from PIL import Image

    with Image.open(MEDIA_DIR / grid["report/samples"]["file_path"]) as shown, \
            Image.open(out / "report" / "samples.png") as written:
        assert shown.size == written.size
    assert storage.get_run_config("vlmlab", run_id=run_id)["train.max_steps"] == "4"
    assert storage.get_alerts("vlmlab", run_id=run_id) == []


def test_a_failing_run_leaves_an_error_alert_in_trackio(trackio_store, tmp_path, monkeypatch):
    import vlmlab.train

    storage, _ = trackio_store

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vlmlab.train, "save_checkpoint", broken)
    out = tmp_path / "trackio-failing"
    with pytest.raises(RuntimeError, match="disk full"):
        vlmlab.train.train(apply_overrides(Config(), [*RUN, "train.max_steps=1", "train.eval_every=0",
                                                       "train.report_to=trackio"]), out)
    (run_id,) = trackio_runs(storage, out)
    assert any("train/loss" in r for r in storage.get_logs("vlmlab", run_id=run_id))
    (alert,) = storage.get_alerts("vlmlab", run_id=run_id)
    assert (alert["title"], alert["level"]) == ("run failed", "error")


def test_a_missing_trackio_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trackio", None)
    assert main(["train", "--out", str(tmp_path), *RUN, "train.report_to=tensorboard,trackio"]) == 2
    assert capsys.readouterr().err.strip() == (
        'error: train.report_to=trackio needs the trackio package: pip install -e ".[tracking]"')
    assert not (tmp_path / "train_log.jsonl").exists()


def test_an_unknown_tracker_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown train.report_to tracker 'wandb'; valid: none, tensorboard, mlflow, "
                                          "trackio"):
        apply_overrides(Config(), ["train.report_to=tensorboard,wandb"])


def test_a_missing_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["train", "--out", str(tmp_path), *RUN, "train.report_to=mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('error: train.report_to=mlflow needs the mlflow (or mlflow-skinny) package: '
                   'pip install -e ".[tracking]"')
    assert not (tmp_path / "train_log.jsonl").exists()


def test_none_writes_no_tracker_folders(tmp_path):
    trackers = Trackers()
    trackers.open(tmp_path, apply_overrides(Config(), ["train.report_to=none"]))
    trackers.log({"step": 1, "loss": 1.0, "eval": {"vqa_accuracy": 0.5}})
    trackers.close()
    assert list(tmp_path.iterdir()) == []


def test_a_record_flattens_to_its_numeric_scalars():
    record = {"step": 3, "loss": 2.0, "note": "text", "eval": {"vqa_accuracy": 0.5, "by": {"color": 1, "x": None}}}
    assert flatten(record) == {"train/loss": 2.0, "eval/vqa_accuracy": 0.5, "eval/by/color": 1.0}
