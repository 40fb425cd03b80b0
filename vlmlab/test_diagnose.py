"""Image-reliance diagnosis on real tiny models: one that learned to read colours from the image (uses_image), the
same LM with its image path cut by closed cross-attention gates (ignores_image), one trained to say nothing
(collapsed); the CLI report, the suspected causes and the training-time alarm."""

import json

import pytest
import torch
from PIL import Image

from vlmlab.cli import main
from vlmlab.config import DataConfig, apply_overrides
from vlmlab.data.example import Example
from vlmlab.diagnose import ConditioningAlarm, diagnose, measure, suspected_causes, verdict
from vlmlab.model import build_vlm
from vlmlab.presets import get_preset
from vlmlab.prompts import format_prompt
from vlmlab.test_model import SMALL
from vlmlab.prompts import training_texts

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
QUESTION = "what color is the picture?"


def colour_examples(answer_of=lambda name: name) -> list[Example]:
    """Two shades of each colour, one question each: the answer is in the image and nowhere else."""
    examples = []
    for name, rgb in COLORS.items():
        for shade in (0, 30):
            image = Image.new("RGB", (32, 32), tuple(max(0, c - shade) for c in rgb))
            examples.append(Example(image, QUESTION, [answer_of(name)] * 3, "color", image_id=f"{name}-{shade}",
                                    example_id=f"{name}-{shade}"))
    return examples


def trained(examples, *overrides, steps=60, lr=3e-3):
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny-gpt2"), [*SMALL, "eval.max_new_tokens=4", *overrides])
    model = build_vlm(cfg, training_texts(colour_examples(), DataConfig()))
    pixels = model.pixels_of([e.image for e in examples])
    prompts = [format_prompt(cfg.data, e.question) for e in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(pixels, prompts, [e.target for e in examples]).backward()
        optimizer.step()
    return model.eval(), cfg


@pytest.fixture(scope="module")
def reader():
    """Learned to name the colour of its image."""
    return trained(colour_examples(), "language.fusion=cross_attention")


def test_a_model_that_reads_the_image(reader):
    model, cfg = reader
    report = diagnose(model, colour_examples(), cfg)
    assert report["verdict"] == "uses_image", report["reason"]
    assert report["score"]["real"] > 0.9 and report["score"]["shuffled"] < 0.3
    assert report["shuffled_image_gap"] > 0.6
    assert report["unchanged_with_shuffled_images"] < 0.3
    assert report["reference_loss_gap"] > 0.5
    assert report["empty_output_rate"] == 0 and report["eos_first_rate"] == 0
    assert report["identical_output_rate"] < 0.5
    assert len(report["cross_attention_gates"]) == 1 and report["cross_attention_relative_update"] > 0
    assert report["suspected_causes"] == [] and "try" not in report


def test_the_same_model_with_its_gates_closed_ignores_the_image(reader):
    model, cfg = reader
    saved = {name: p.detach().clone() for name, p in model.language.fusion.named_parameters()}
    with torch.no_grad():
        for block in model.language.fusion.blocks:
            block.attention_gate.zero_()
            block.ff_gate.zero_()
    try:
        report = diagnose(model, colour_examples(), cfg)
    finally:
        model.language.fusion.load_state_dict(saved)
    assert report["verdict"] == "ignores_image", report["reason"]
    assert report["unchanged_with_shuffled_images"] == 1.0 and report["identical_output_rate"] == 1.0
    assert report["reference_loss_gap"] == pytest.approx(0.0, abs=1e-6)
    assert report["shuffled_image_gap"] == pytest.approx(0.0)
    assert "nats per token" in report["reason"]
    assert [c["cause"] for c in report["suspected_causes"]] == ["closed cross-attention gates"]


@pytest.fixture(scope="module")
def mute():
    """Trained on empty answers, with padding trained as EOS and one visual token: all it learned is to stop."""
    return trained(colour_examples(lambda name: ""), "connector.num_queries=1", "language.train_padding_as_eos=true",
                   "train.lr=0.02", steps=30, lr=1e-2)


def test_a_model_that_stops_at_once_is_collapsed_and_the_causes_are_named(mute):
    model, cfg = mute
    report = diagnose(model, colour_examples(), cfg, train_log=[{"loss": 3.0}, {"loss": 0.5}, {"loss": 2.0}])
    assert report["verdict"] == "collapsed"
    assert report["empty_output_rate"] == 1.0 and report["eos_first_rate"] == 1.0 and report["eos_first_prob"] > 0.5
    assert report["visual_attention_share"] is not None and 0 < report["visual_attention_uniform"] < 1
    causes = {cause["cause"] for cause in report["suspected_causes"]}
    assert {"padding trained as EOS", "short or overlooked visual prefix", "unstable full fine-tuning"} <= causes
    assert "eos_loss_weight" in report["try"]


def test_suspected_causes_follow_the_evidence(reader):
    model, cfg = reader
    signals = measure(model, colour_examples(), cfg)
    assert suspected_causes(model, signals, cfg, train_log=[]) == []  # cross-attention, lr 2e-3, plenty of data
    small = apply_overrides(get_preset("tiny-gpt2"), ["data.train_images=20", "data.questions_per_image=0",
                                                      "train.max_steps=500"])
    assert [c["cause"] for c in suspected_causes(model, signals, small, [])] == ["too little data"]
    adapters_fast = apply_overrides(get_preset("tiny-gpt2"), ["language.train=lora", "train.lr=0.02"])
    assert [c["cause"] for c in suspected_causes(model, signals, adapters_fast, [])] == ["high learning rate"]
    memorised = [{"loss": 0.01}]  # training batches fit, held-out references not
    signals = {**signals, "reference_loss": {"real": 1.5}}
    assert [c["cause"] for c in suspected_causes(model, signals, cfg, memorised)] == ["too little data"]


def test_verdict_names_the_signal_that_fired():
    healthy = {"empty_output_rate": 0.0, "eos_first_rate": 0.0, "unchanged_with_shuffled_images": 0.2,
               "reference_loss_gap": 0.8}
    assert verdict(healthy)[0] == "uses_image"
    assert verdict({**healthy, "eos_first_rate": 0.7})[2] == ["eos_first_rate=0.70"]
    name, _, fired = verdict({**healthy, "reference_loss_gap": 0.01})
    assert name == "ignores_image" and fired == ["reference_loss_gap=0.010"]
    scored = {**healthy, "score_name": "vqa_accuracy", "score": {"real": 0.5, "shuffled": 0.49},
              "shuffled_image_gap": 0.01}
    assert verdict(scored)[0] == "ignores_image"


def test_alarm_warns_after_warmup_with_the_signal_and_what_to_try(mute, reader, capsys):
    model, cfg = mute
    cfg = apply_overrides(cfg, ["train.alarm_every=10", "train.alarm_warmup=20"])
    alarm = ConditioningAlarm(cfg, colour_examples(), model.vision.image_size)
    assert [step for step in range(1, 41) if alarm.due(step)] == [20, 30, 40]
    record = alarm.check(model, 20)
    warning = capsys.readouterr().err
    assert record["verdict"] == "collapsed" and "eos_first_rate=1.00" in record["signals_fired"]
    assert "step 20" in warning and "eos_first_rate" in warning and "eos_loss_weight" in warning
    model, cfg = reader
    assert ConditioningAlarm(cfg, colour_examples(), 64).check(model, 20)["verdict"] == "uses_image"
    assert capsys.readouterr().err == ""


def test_cli_reports_json(reader, tmp_path, capsys):
    model, _ = reader
    model.save(tmp_path / "model")
    lines = []
    for example in colour_examples():
        example.image.save(tmp_path / f"{example.image_id}.png")
        lines.append(json.dumps({"image": f"{example.image_id}.png", "question": QUESTION,
                                 "answers": example.answers}))
    (tmp_path / "colours.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["diagnose", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "colours.jsonl"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "uses_image"
    for key in ("empty_output_rate", "eos_first_rate", "shuffled_image_gap", "mean_output_words",
                "identical_output_rate", "reference_loss_gap"):
        assert key in report
    assert main(["diagnose", "--model", str(tmp_path / "model"), "--max-examples", "-1"]) == 2


def test_training_logs_the_alarm_checks(tmp_path):
    from vlmlab.test_cli import FAST

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--preset", "tiny-gpt2", *FAST, "train.eval_every=0",
                 "train.save_every=0", "train.alarm_every=2", "train.alarm_warmup=4", "train.alarm_examples=8"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    checks = [r for r in records if "conditioning" in r]
    assert [r["step"] for r in checks] == [4]  # every 2 steps, none before the warm-up
    assert checks[0]["conditioning"]["verdict"] in ("uses_image", "ignores_image", "collapsed")
    assert {"eos_first_rate", "unchanged_with_shuffled_images", "reference_loss_gap"} <= set(checks[0]["conditioning"])
