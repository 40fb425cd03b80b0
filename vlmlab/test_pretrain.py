"""The text-pretrained tiny LM: it learns the caption language, one folder serves every run asking for the same
one, and the run then loads it by path like any pretrained LM (LoRA included)."""

import pytest
import torch

from vlmlab.config import ConfigError, apply_overrides
from vlmlab.data import load_examples
from vlmlab.language import build_language
from vlmlab.pretrain import pretrained_language
from vlmlab.presets import get_preset
from vlmlab.prompts import format_prompt
from vlmlab.test_model import SMALL
from vlmlab.train import train

PRETRAIN = [*SMALL, "language.pretrain_steps=30", "language.pretrain_images=32", "data.eval_images=16"]
RUN = [*PRETRAIN, "data.train_images=8", "data.eval_images=2", "train.batch_size=4", "train.max_steps=2",
       "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0", "train.alarm_every=0",
       "eval.caption_metrics=false", "eval.shuffled_control=false"]


def caption_loss(folder, cfg) -> float:
    lm = build_language(apply_overrides(cfg, [f"language.model={folder}", "language.pretrain_steps=0"]).language)
    examples = load_examples("synthetic", "val", cfg.data)
    with torch.no_grad():
        prompts = lm.encode_prompts([format_prompt(cfg.data, e.question) for e in examples])
        return float(lm.loss(torch.zeros(len(examples), 0, lm.hidden_size), prompts,
                             lm.encode_targets([e.target for e in examples])))


def test_the_lm_learns_captions_and_one_folder_serves_every_run(tmp_path):
    cfg = apply_overrides(get_preset("tiny-gpt2"), [*PRETRAIN, "data.questions_per_image=0"])
    folder = pretrained_language(cfg, tmp_path)
    assert folder.name.startswith("lm-") and (folder / "recipe.json").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained_language(cfg, tmp_path) == folder  # asked again: read, not trained again
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert pretrained_language(apply_overrides(cfg, ["train.seed=1"]), tmp_path) != folder
    untrained = pretrained_language(apply_overrides(cfg, ["language.pretrain_steps=1"]), tmp_path)
    assert caption_loss(folder, cfg) < caption_loss(untrained, cfg) - 0.5


def test_a_run_loads_it_by_path_and_can_adapt_it_with_lora(tmp_path):
    cfg = apply_overrides(get_preset("tiny-gpt2"), [*RUN, "language.train=lora", "language.lora_rank=2"])
    train(cfg, tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"model: {(tmp_path / 'run' / 'feature_cache').resolve()}/lm-" in saved
    assert "pretrain_steps: 0" in saved  # the saved config names the LM's folder, whose recipe.json says the rest
    with pytest.raises(ConfigError, match="language.pretrain_steps=30 is not allowed; it pretrains a tiny LM"):
        apply_overrides(get_preset("tiny-gpt2"), [*RUN, "language.model=gpt2"])
    with pytest.raises(ConfigError, match="adapts a pretrained model"):
        train(apply_overrides(get_preset("tiny-gpt2"), [*RUN, "language.pretrain_steps=0", "language.train=lora"]),
              tmp_path / "scratch")
