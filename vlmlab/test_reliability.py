"""What vlmlab guarantees when things go wrong, end to end through the command line: a run killed with SIGKILL
resumes to the metrics of an uninterrupted one, the same seed gives the same metrics, bad questions and bad
arguments end in one line and the documented exit code, and nothing unsafe is unpickled."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vlmlab import VLM
from vlmlab.cli import main
from vlmlab.config import validate
from vlmlab.data.synthetic import make_split
from vlmlab.presets import PRESETS, get_preset
from vlmlab.test_faults import one_thread  # noqa: F401 (an autouse fixture: the killed subprocess uses one thread)
from vlmlab.test_model import SMALL

QUICK = [*SMALL, "data.train_images=8", "data.eval_images=2", "data.captions=false", "train.batch_size=6",
         "train.max_steps=10", "train.log_every=1", "train.eval_every=0", "train.save_every=2",
         "train.warmup_steps=2", "eval.caption_metrics=false", "eval.shuffled_control=false"]
MEASURED = ("train_seconds", "train_samples_per_second", "peak_memory_bytes")  # vary from run to run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    make_split("test", 1)[0].image.save(path)
    return path


def _outcome(run) -> tuple[dict, list, dict]:
    """Everything a run ends with except measured time and memory: metrics (costs counted included), the training
    log, the weights."""
    metrics = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in MEASURED}
    log = [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_second", "elapsed_seconds")}
           for line in (run / "train_log.jsonl").read_text().splitlines()]
    return metrics, log, load_file(run / "model" / "connector.safetensors")


def _assert_same_outcome(first, second):
    (metrics_a, log_a, weights_a), (metrics_b, log_b, weights_b) = _outcome(first), _outcome(second)
    assert metrics_a == metrics_b
    assert log_a == log_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_same_seed_and_config_give_the_same_metrics(run, tmp_path):
    assert main(["train", "--out", str(tmp_path), *QUICK]) == 0
    _assert_same_outcome(run, tmp_path)


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(run, tmp_path):
    state, log = tmp_path / "checkpoint" / "trainer_state.pt", tmp_path / "train_log.jsonl"

    def past_first_checkpoint() -> bool:  # step 4 logged: the checkpoint of step 3 is on disk, later steps run
        return state.exists() and log.exists() and '"step": 4,' in log.read_text()

    child = subprocess.Popen([sys.executable, "-m", "vlmlab", "train", "--out", str(tmp_path), *QUICK,
                              "train.save_every=3"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not past_first_checkpoint() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL and not (tmp_path / "metrics.json").exists()
    resumed_from = torch.load(state, weights_only=True)["step"]
    assert resumed_from in (3, 6, 9)
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 0
    _assert_same_outcome(run, tmp_path)


def test_a_run_with_data_workers_and_augmentation_resumes_exactly(tmp_path, monkeypatch):
    # Worker processes draw the augmentation; each draw is seeded by the run's seed, the micro-batch's number and
    # the example, so a resumed run draws what the uninterrupted one drew, whichever worker makes the item.
    config = [*QUICK, "train.max_steps=6", "train.save_every=3", "train.num_workers=2", "data.random_resize=0.6"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--out", str(whole), *config]) == 0
    real_forward, calls = VLM.forward, []

    def forward(self, *args, **kwargs):  # interrupted in step 5, after the checkpoint of step 3
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(VLM, "forward", forward)
    assert main(["train", "--out", str(cut), *config]) == 130
    monkeypatch.undo()
    assert torch.load(cut / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert main(["train", "--out", str(cut), "--resume"]) == 0
    _assert_same_outcome(whole, cut)


def test_resume_after_a_kill_between_the_renames_of_a_checkpoint_swap(run, tmp_path):
    # The state a kill leaves halfway through replacing checkpoint/: the old one aside, a new one not yet in place.
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *QUICK, "train.max_steps=4", "train.save_every=2"]) == 0
    (out / "metrics.json").unlink()
    os.replace(out / "checkpoint", out / "checkpoint.old")
    (out / "checkpoint.partial").mkdir()
    (out / "checkpoint.partial" / "trainer_state.pt").write_bytes(b"half written")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 4


def test_a_tampered_trainer_state_is_refused_not_unpickled(run, tmp_path, capsys):
    import shutil

    out = shutil.copytree(run, tmp_path / "run")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"step": 1, "payload": Payload()}, out / "checkpoint" / "trainer_state.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "trainer_state.pt: refused" in error[0] and not marker.exists()


def test_exit_codes_of_ask_and_caption(run, image, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases = [
        (["caption", "--model", str(run), str(image), str(image)], 0),  # every image captioned
        (["caption", "--model", str(run), str(image), str(broken)], 1),  # one failed, the other still captioned
        (["caption", "--model", str(run), str(broken)], 1),
        (["caption", "--model", str(tmp_path / "no-model"), str(image)], 2),
        (["ask", "--model", str(run), str(image), "what color is the circle?"], 0),
        (["ask", "--model", str(run), str(image), "  "], 2),
        (["ask", "--model", str(run), str(broken), "what color is the circle?"], 2),
        (["ask", "--model", str(tmp_path / "no-model"), str(image), "what color is the circle?"], 2),
    ]
    for args, code in cases:
        capsys.readouterr()
        assert main(args) == code, args
        out, err = capsys.readouterr()
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == (code == 2), (args, err)
        if args[0] == "caption" and code != 2:
            assert [("error" in json.loads(line)) for line in out.splitlines()] == [p == str(broken) for p in args[3:]]
    main(["ask", "--model", str(run), str(image), ""])
    assert capsys.readouterr().err == "error: the question is empty; ask something about the image\n"


def test_a_very_long_question_is_cut_to_the_prompt_budget_with_a_warning(run, image, capsys):
    model = VLM.load(run, device="cpu")
    budget = model.config.language.max_prompt_tokens
    question = "is the red circle left of the blue square " * 40
    answer = model.ask(image, question)
    warning = capsys.readouterr().err
    assert isinstance(answer, str) and "question cut to its first" in warning and f"={budget}" in warning
    kept = int(warning.split("first ")[1].split(" ")[0])
    from vlmlab.prompts import format_prompt

    assert 0 < kept < len(question)
    assert model.language.prompt_length(format_prompt(model.config.data, question[:kept])) <= budget
    assert model.language.prompt_length(format_prompt(model.config.data, question[: kept + 1])) > budget
    # What fits is not cut: the same answer, and no warning.
    short = "what color is the circle?"
    assert model.ask(image, short) == model.ask(image, short) and "cut" not in capsys.readouterr().err


@pytest.mark.parametrize("question", ["这个圆是什么颜色？", "ما لون الدائرة؟", "🔴 or 🔵? 👀", "naïve {question} {0} %s \\n"])
def test_questions_in_any_script_are_answered(run, image, question, capsys):
    model = VLM.load(run, device="cpu")
    tokenizer = model.language.tokenizer
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids).strip() == question.strip()
    assert isinstance(model.ask(image, question), str)
    capsys.readouterr()
    assert main(["ask", "--model", str(run), str(image), question]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("override, named", [
    ("train.batch_size=0", "train.batch_size=0 is not allowed; it must be at least 1"),
    ("train.precision=fp8", "train.precision='fp8' is not allowed; valid: auto, fp32, bf16, fp16"),
    ("train.device=gpu", "train.device='gpu' is not allowed; valid: auto, cpu, cuda, cuda:N, mps"),
    ("train.lr=-1", "train.lr=-1.0 is not allowed; it must be greater than 0"),
    ("train.max_steps=ten", "train.max_steps expects int, got 'ten'"),
])
def test_config_errors_name_the_key_the_value_and_what_is_allowed(override, named, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), override]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {named}"]
    assert not (tmp_path / "config.yaml").exists(), "nothing is written before the config is checked"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_passes_the_config_checks(preset):
    validate(get_preset(preset))


def test_overrides_of_other_commands_are_checked_too(run, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "eval.num_beams=0"]) == 2
    assert capsys.readouterr().err == "error: eval.num_beams=0 is not allowed; it must be at least 1\n"
