"""`plan`: the simulated training step counts exactly the memory a real one uses, and the proposal follows it."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vlmlab.cli import main
from vlmlab.config import ConfigError, apply_overrides
from vlmlab.model import build_vlm
from vlmlab.plan import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    GIB,
    GPUS,
    Gpu,
    build_from_architecture,
    candidates,
    fill_flops,
    plan,
    plan_lines,
    step_flops,
    step_peak,
    to_fake,
    training_hours,
    warm_optimizer,
)
from vlmlab.presets import get_preset
from vlmlab.test_families import checkpoints, family_config  # noqa: F401 (a fixture)

TINY = ["connector.num_queries=4", "train.batch_size=8", "language.max_prompt_tokens=12",
        "language.max_target_tokens=6"]


def _real_peak(cfg, micro_batch, accumulating, amp_dtype, cached=False, parked=False):
    torch.manual_seed(0)
    model = build_vlm(cfg).train()
    return step_peak(model, warm_optimizer(model), cfg, micro_batch, accumulating, amp_dtype, cached, parked)


def _simulated_peak(cfg, micro_batch, accumulating, amp_dtype, cached=False, parked=False):
    model = build_from_architecture(cfg).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_fake(model)
        return step_peak(model, warm_optimizer(model), cfg, micro_batch, accumulating, amp_dtype, cached, parked)


@pytest.mark.parametrize("vision, language, mode, accumulating, amp_dtype", [
    ("clip", "t5", "lora", False, None),
    ("siglip", "llama", "dora", True, torch.bfloat16),
])
def test_simulated_step_uses_the_memory_a_real_step_uses(checkpoints, vision, language, mode, accumulating,
                                                         amp_dtype):
    cfg = family_config(checkpoints, vision, language, f"language.train={mode}", *TINY)
    real = _real_peak(cfg, 4, accumulating, amp_dtype)
    assert real > 0
    # Equal in fp32; under autocast a few meta kernels give their small side outputs (layer-norm statistics)
    # another dtype than the CPU kernels do.
    assert abs(_simulated_peak(cfg, 4, accumulating, amp_dtype) - real) <= (0.01 * real if amp_dtype else 0)


def test_a_step_from_the_feature_cache_is_simulated_too_and_the_parked_tower_not_counted(checkpoints):
    cfg = family_config(checkpoints, "clip", "t5", "language.train=lora", *TINY)
    real = _real_peak(cfg, 4, False, None, cached=True, parked=True)
    assert _simulated_peak(cfg, 4, False, None, cached=True, parked=True) == real
    vision = build_vlm(cfg).vision
    tower = sum(t.numel() * t.element_size() for t in (*vision.parameters(), *vision.buffers()))
    assert _real_peak(cfg, 4, False, None, cached=True) == real + tower  # the same step, the tower resident


def test_plan_counts_the_cache_fill_and_the_parked_tower(checkpoints):
    cfg = family_config(checkpoints, "clip", "t5", "language.train=lora", *TINY)
    cached = plan(cfg, "t4")
    assert cached["feature_cache"] and cached["tower_parked"]
    assert any("feature cache" in note for note in cached["notes"])
    resident = plan(apply_overrides(cfg, ["train.park_tower=false"]), "t4")
    assert resident["feature_cache"] and not resident["tower_parked"]
    uncached = plan(apply_overrides(cfg, ["train.feature_cache=off"]), "t4")
    assert not uncached["feature_cache"] and not any("feature cache" in note for note in uncached["notes"])
    peaks = [result["tried"][0]["peak_bytes"] for result in (cached, resident, uncached)]
    # parking takes the tower's weights out of the step; the tower's own activations, without gradients, are
    # gone before the step's peak (in the LM's backward), so reading cached features saves nothing more here
    assert peaks[0] < peaks[1] <= peaks[2]


def test_the_simulated_steps_flops_are_a_real_steps_and_give_the_time(checkpoints):
    cfg = family_config(checkpoints, "clip", "t5", "language.train=lora", "data.train_size=100", *TINY)
    result = plan(cfg, "t4")
    torch.manual_seed(0)
    model = build_vlm(cfg).train()  # real weights, the same shapes
    micro, accum = result["proposal"]["train.batch_size"] // result["proposal"]["train.grad_accum"], \
        result["proposal"]["train.grad_accum"]
    assert result["flops"]["per_step"] == accum * step_flops(model, warm_optimizer(model), cfg, micro, None, True)
    assert result["flops"]["fill_per_image"] == fill_flops(model, cfg, None) > 0  # the tower on one image
    assert training_hours(result["flops"], cfg, "a100-80g") < result["hours"]
    steps = cfg.train.max_steps
    added = training_hours(result["flops"], apply_overrides(cfg, [f"train.max_steps={2 * steps}"]), "t4") \
        - result["hours"]  # the steps' share, at a quarter of the T4's 65 TFLOPS
    assert added * 3600 == pytest.approx(result["flops"]["per_step"] * steps / (65e12 * 0.25))
    assert "GPU hours of training" in "\n".join(plan_lines("default", result))


def test_tied_and_untied_output_layers_are_counted_as_saved(checkpoints):
    for language in ("t5", "gpt2"):
        cfg = family_config(checkpoints, "clip", language, "language.train=full")
        real = sum(p.numel() for p in build_vlm(cfg).language.parameters())
        assert sum(p.numel() for p in build_from_architecture(cfg).language.parameters()) == real


def test_candidates_prefer_modest_accumulation_then_checkpointing():
    assert candidates(32) == [(1, False), (2, False), (4, False), (1, True), (2, True), (4, True), (8, True),
                              (16, True), (32, True), (8, False), (16, False), (32, False)]
    assert candidates(6) == [(1, False), (2, False), (1, True), (2, True)]


def test_proposal_is_the_first_candidate_that_fits(checkpoints, monkeypatch):
    cfg = family_config(checkpoints, "clip", "gpt2", "language.train=full", *TINY)
    roomy = plan(cfg, "a100-80g")
    assert [row["fits"] for row in roomy["tried"]] == [True]
    assert roomy["precision"] == "bf16"
    assert roomy["proposal"] == {"train.batch_size": 8, "train.grad_accum": 1, "train.gradient_checkpointing": False,
                                 "train.precision": "bf16"}
    # A GPU one byte short of what the whole batch needs: the plan goes on to accumulation.
    needed = roomy["tried"][0]["peak_bytes"] * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB
    monkeypatch.setitem(GPUS, "small", Gpu("small", (needed - 1) / GIB, bf16=True, half_tflops=100.0))
    tight = plan(cfg, "small")
    assert [row["fits"] for row in tight["tried"]] == [False, True]
    assert tight["proposal"]["train.grad_accum"] == 2 and not tight["proposal"]["train.gradient_checkpointing"]
    assert tight["tried"][1]["peak_bytes"] < tight["tried"][0]["peak_bytes"]


def test_precision_follows_the_gpu():
    with pytest.raises(ConfigError, match="has no bf16"):
        plan(apply_overrides(get_preset("recommended"), ["train.precision=bf16"]), "t4")
    with pytest.raises(ConfigError, match="plan needs a pretrained vision part"):
        plan(get_preset("default"), "t4")
    with pytest.raises(ConfigError, match="unknown GPU"):
        plan(get_preset("recommended"), "v100")


def test_plan_command_prints_json_and_text(checkpoints, capsys):
    overrides = [f"vision.model={checkpoints['clip']}", f"language.model={checkpoints['t5']}",
                 "vision.train=frozen", "language.train=lora", "connector.hidden_size=32", "connector.num_heads=2",
                 *TINY]
    assert main(["plan", "--preset", "default", "--gpu", "t4", "--json", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "default" and result["precision"] == "fp16" and result["proposal"]
    assert result["parts"]["vision"]["trainable_m"] == 0 and result["parts"]["language"]["trainable_m"] > 0
    assert any("wo" in note for note in result["notes"])  # T5 in fp16: its wo layers run in fp32
    text = "\n".join(plan_lines("default", {key: value for key, value in result.items() if key != "preset"}))
    assert "fp16 with a loss scaler" in text and "proposal: vlmlab train --preset default" in text
    assert main(["plan", "--preset", "default", "--gpu", "t4"]) == 2  # tiny parts: one clear error line
    assert "plan needs a pretrained" in capsys.readouterr().err
