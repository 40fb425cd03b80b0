"""Numerical faults and interrupted writes: the real handlers, driven by faults injected into a tiny model on CPU."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.cli import main
from vlmlab.config import DataConfig
from vlmlab.data.batching import ExampleDataset, collate
from vlmlab.data.synthetic import make_split
from vlmlab.faults import (FaultGuard, TrainingFault, partial_of, recover_directory, replace_directory,
                           split_batch, truncate_log)
from vlmlab.model import VLM, build_vlm
from vlmlab.test_model import SMALL, small
from vlmlab.prompts import training_texts

# A tower without BatchNorm: a micro-batch cut in pieces then gives exactly the uncut gradient (the default's
# ResNet normalises by the statistics of whatever piece it sees).
TINY = ["--preset", "tiny-qformer", *SMALL, "data.train_images=6", "data.eval_images=2", "data.captions=false",
        "train.batch_size=6", "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
        "train.warmup_steps=1", "eval.caption_metrics=false", "eval.shuffled_control=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and runs compared bit for bit must use the same number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _inject(monkeypatch, fault):
    """Wraps the model's forward pass: `fault(call, batch_size, loss)` may raise or return a changed loss."""
    real_forward, calls = VLM.forward, []

    def forward(self, pixels, prompts, targets, image_index=None, features=None, views=None):
        calls.append(len(prompts))
        loss = real_forward(self, pixels, prompts, targets, image_index, features, views)
        return fault(len(calls), len(prompts), loss)

    monkeypatch.setattr(VLM, "forward", forward)
    return calls


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clean")
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def batch_and_model():
    examples = make_split("train", 3, questions_per_image=3, captions=False)
    model = build_vlm(small("tiny-qformer"), training_texts(examples, DataConfig()))
    dataset = ExampleDataset(examples, DataConfig(), model.vision.image_size)
    return collate([dataset[i] for i in range(len(examples))]), model


def test_split_batch_keeps_every_example_with_its_own_image(batch_and_model):
    batch, _ = batch_and_model
    pieces = split_batch(batch, 3)
    assert [len(p["prompts"]) for p in pieces] == [3, 3, 3]
    assert sum((p["targets"] for p in pieces), []) == batch["targets"]
    for piece, start in zip(pieces, (0, 3, 6)):
        for i in range(len(piece["prompts"])):
            assert torch.equal(piece["pixels"][piece["image_index"][i]],
                               batch["pixels"][batch["image_index"][start + i]])
            assert piece["image_keys"][piece["image_index"][i]] == piece["examples"][i].image_id


def test_pieces_of_a_cut_micro_batch_give_the_uncut_gradient(batch_and_model):
    batch, model = batch_and_model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def backward(piece, share):
        loss = model(piece["pixels"], piece["prompts"], piece["targets"], piece["image_index"]) * share
        loss.backward()
        return loss.item()

    guard = FaultGuard(5, 9, 1, model.language.answer_tokens, lambda record: None)
    losses, gradients = [], []
    for piece_size in (None, 2):
        guard.piece_size = piece_size
        losses.append(guard.accumulate(1, [batch], backward, optimizer))
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for uncut, cut in zip(*gradients):
        torch.testing.assert_close(cut, uncut, rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(clean_run, tmp_path, monkeypatch, capsys):
    # A "GPU" that holds at most 2 examples per forward pass: 6 -> 3 -> 2, then the run goes on.
    def fault(call, size, loss):
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return loss

    sizes = _inject(monkeypatch, fault)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 0
    err = capsys.readouterr().err
    assert "step 1: out of memory; micro-batch 6 -> 3 examples, gradient accumulation 1 -> 2" in err
    assert "step 1: out of memory; micro-batch 3 -> 2 examples, gradient accumulation 2 -> 3" in err
    assert sizes[:2] == [6, 3] and set(sizes[2:]) == {2} and len(sizes) == 2 + 3 * 3
    faults = [r for r in _log(tmp_path) if r.get("fault") == "out of memory"]
    assert [(r["step"], r["micro_batch"]) for r in faults] == [(1, 3), (1, 2)]
    assert _metrics(tmp_path)["out_of_memory_events"] == 2
    # Same data, same effective batch, same gradient: the weights end where the run without the fault ends.
    cut = load_file(tmp_path / "model" / "connector.safetensors")
    uncut = load_file(clean_run / "model" / "connector.safetensors")
    for name in uncut:
        torch.testing.assert_close(cut[name], uncut[name], rtol=1e-3, atol=1e-5)


def test_out_of_memory_with_one_example_stops_with_one_line(tmp_path, monkeypatch, capsys):
    def fault(call, size, loss):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    _inject(monkeypatch, fault)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: step 1: out of memory with one example per forward pass")


def test_a_nan_loss_skips_the_step_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, lambda call, size, loss: loss * math.nan if call == 2 else loss)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr()
    assert "step 2: non-finite loss" in out.err and "update skipped" in out.err
    assert "skipped steps       1" in out.out
    assert [r for r in _log(tmp_path) if "fault" in r] == [{"step": 2, "fault": "non-finite loss", "in_a_row": 1}]
    assert _metrics(tmp_path)["skipped_steps"] == 1
    weights = load_file(tmp_path / "model" / "connector.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()), "a NaN step must not reach the weights"


def test_persistent_nan_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, lambda call, size, loss: loss * math.inf)
    assert main(["train", "--out", str(tmp_path), *TINY, "train.max_steps=10", "train.max_bad_steps=3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: stopped at step 3: 3 steps in a row had a non-finite loss or gradient")
    assert "train.max_bad_steps=3" in error


def test_a_non_finite_gradient_counts_and_a_good_step_resets_the_streak():
    records = []
    guard = FaultGuard(2, 8, 1, len, records.append)
    assert not guard.step_is_finite(1, 0.5, torch.tensor(math.inf))
    assert guard.step_is_finite(2, 0.5, torch.tensor(1.0))
    assert not guard.step_is_finite(3, 0.5, torch.tensor(math.nan))
    with pytest.raises(TrainingFault, match="2 steps in a row"):
        guard.step_is_finite(4, math.nan, torch.tensor(1.0))
    assert [r["fault"] for r in records] == ["non-finite gradient"] * 2 + ["non-finite loss"]
    assert guard.counts() == {"skipped_steps": 3, "out_of_memory_events": 0}


def test_resumed_counts_come_from_the_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": 1, "fault": "out of memory", "micro_batch": 4}, {"step": 1, "loss": 1.0},
             {"step": 2, "fault": "non-finite loss", "in_a_row": 1}, {"step": 3, "fault": "non-finite loss", "in_a_row": 2},
             {"step": 3, "loss": math.inf}, {"step": 4, "fault": "non-finite loss", "in_a_row": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')  # killed mid-line
    truncate_log(log, 3)
    assert [json.loads(line) for line in log.read_text().splitlines()] == lines[:5]
    guard = FaultGuard(5, 8, 1, len, lambda record: None)
    guard.resume(log, 3)
    assert (guard.piece_size, guard.bad_steps, guard.bad_in_a_row, guard.out_of_memory) == (4, 2, 2, 1)


def _folder(path, text):
    path.mkdir()
    (path / "state").write_text(text)
    return path


def test_replace_directory_swaps_a_complete_folder_in(tmp_path):
    final = _folder(tmp_path / "checkpoint", "old")
    _folder(partial_of(final), "new")
    replace_directory(final)
    assert (final / "state").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_recover_directory_after_a_kill_between_the_two_renames(tmp_path):
    final = tmp_path / "checkpoint"
    _folder(tmp_path / "checkpoint.old", "previous")  # final was moved aside, the new one not yet moved in
    _folder(partial_of(final), "complete but unpublished")
    recover_directory(final)
    assert (final / "state").read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_recover_directory_drops_a_half_written_folder(tmp_path):
    final = _folder(tmp_path / "checkpoint", "good")
    _folder(partial_of(final), "half")
    recover_directory(final)
    assert (final / "state").read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def _inject_generation(monkeypatch, fault):
    """Wraps generation: `fault(call, batch_size)` may raise; returns the batch sizes asked for."""
    real_generate, sizes = VLM.generate, []

    def generate(self, pixels, prompts, max_new_tokens, image_index=None, **options):
        sizes.append(len(prompts))
        fault(len(sizes), len(prompts))
        return real_generate(self, pixels, prompts, max_new_tokens, image_index, **options)

    monkeypatch.setattr(VLM, "generate", generate)
    return sizes


def _predictions(run) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def test_out_of_memory_in_evaluation_halves_the_batch_and_goes_on(clean_run, tmp_path, monkeypatch, capsys):
    # A "GPU" that generates for at most 2 examples at once: the batch is halved until it fits, then kept.
    def fault(call, size):
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    sizes = _inject_generation(monkeypatch, fault)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "evaluation: out of memory" in line]
    first = sizes[0]
    assert first > 4 and sizes[1] == (first + 1) // 2 and max(sizes[2:]) <= 2
    assert warnings[0] == f"warning: evaluation: out of memory; generation batch {first} -> {sizes[1]} examples"
    assert len(warnings) == _metrics(tmp_path)["eval_out_of_memory_events"] == 2
    # Every example answered, and answered as without the fault.
    assert _predictions(tmp_path) == _predictions(clean_run)
    assert _metrics(tmp_path)["vqa_accuracy"] == _metrics(clean_run)["vqa_accuracy"]
    assert _metrics(clean_run)["eval_out_of_memory_events"] == 0


def test_out_of_memory_in_evaluation_with_one_example_stops_after_the_model_is_saved(tmp_path, monkeypatch, capsys):
    def fault(call, size):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    _inject_generation(monkeypatch, fault)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: evaluation: out of memory generating for one example")
    assert "vlmlab eval --model" in error and not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    assert VLM.load(tmp_path, device="cpu").ask(make_split("test", 1)[0].image, "what color is the circle?") is not None


def test_a_skipped_first_step_gives_no_scheduler_warning(tmp_path, monkeypatch, recwarn):
    # The schedule steps with every step, applied or skipped; torch's "lr_scheduler.step() before
    # optimizer.step()" warning said otherwise when the very first one was skipped.
    _inject(monkeypatch, lambda call, size, loss: loss * math.nan if call == 1 else loss)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 0
    assert _metrics(tmp_path)["skipped_steps"] == 1
    assert [str(w.message) for w in recwarn if "lr_scheduler.step()" in str(w.message)] == []


def test_two_writers_of_one_file_each_rename_a_whole_file_of_their_own(tmp_path):
    # Runs sharing a feature cache write the same recipe.json at once; one temporary name for both made the
    # second rename find nothing.
    from concurrent.futures import ThreadPoolExecutor

    from vlmlab.faults import write_text_atomically

    target = tmp_path / "recipe.json"

    def write_many(text: str) -> None:
        for _ in range(300):
            write_text_atomically(target, text)

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(write_many, "a" * 1000), pool.submit(write_many, "b" * 1000)]:
            done.result()
    assert target.read_text() in ("a" * 1000, "b" * 1000) and [p.name for p in tmp_path.iterdir()] == ["recipe.json"]
