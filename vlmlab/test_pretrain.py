"""The text-pretrained tiny LM: it learns the caption language, one folder serves every run asking for the same
one, and the run then loads it by path like any pretrained LM (LoRA included); `vlmlab pretrain-lm` learns world
v2's facts from its corpus and saves an LM a run starts from."""

import json

import pytest
import torch

from vlmlab.cli import main
from vlmlab.config import ConfigError, apply_overrides
from vlmlab.data import load_examples, world
from vlmlab.language import build_language
from vlmlab.pretrain import fact_accuracy, pretrain_lm, pretrained_language
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


def test_pretrain_lm_learns_the_worlds_facts_and_saves_what_it_learned(tmp_path):
    cfg = apply_overrides(get_preset("default"), SMALL)
    recipe = pretrain_lm(cfg, tmp_path / "lm", steps=200, scenes=40)
    saved = json.loads((tmp_path / "lm" / "recipe.json").read_text())
    assert saved == recipe and saved["corpus"]["generator"] == "scatter"  # v1, the default world, has no facts
    # Loaded back by path, as a run loads it: the facts whose answer is a word (not yes / no, where "no" alone is
    # right 7 times in 8) are known far beyond a guess (1 in 8 colours, 1 in 4 side counts)
    lm = build_language(apply_overrides(get_preset("default"), [*SMALL, f"language.model={tmp_path / 'lm'}"]).language)
    lm.model.eval()
    assert round(fact_accuracy(lm, cfg.data), 4) == saved["fact_accuracy"]
    open_facts = [(q, a) for q, a in world.facts() if a not in ("yes", "no")]
    prompts = lm.encode_prompts([format_prompt(cfg.data, q) for q, _ in open_facts])
    said = lm.generate(torch.zeros(len(prompts), 0, lm.hidden_size), prompts, max_new_tokens=8)
    assert sum(s == a for s, (_, a) in zip(said, open_facts)) / len(open_facts) >= 0.75
    untrained = pretrain_lm(cfg, tmp_path / "untrained", steps=1, scenes=1000)
    assert untrained["fact_accuracy"] < saved["fact_accuracy"]
    corpus = untrained["corpus"]  # among many captions the facts are repeated to about half of the pairs
    stated = (corpus["facts"] + corpus["sentences"]) * corpus["fact_copies"]
    assert corpus["fact_copies"] > 1 and stated + 1000 == corpus["pairs"] and 0.4 < stated / corpus["pairs"] < 0.6


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_the_pretrain_lm_command_saves_an_lm_a_world_v2_run_starts_from(family, tmp_path, capsys):
    folder = tmp_path / "lm"
    assert main(["pretrain-lm", "--out", str(folder), "--family", family, "--steps", "3", "--scenes", "4",
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"tiny {family} LM trained 3 steps" in printed and f"language.model={folder}" in printed
    assert json.loads((folder / "recipe.json").read_text())["language"]["family"] == family
    run = [*RUN, "language.pretrain_steps=0", "data.world.generator=scatter", f"language.model={folder}"]
    train(apply_overrides(get_preset("default"), run), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "knowledge" in metrics["vqa_accuracy_by_family"]


def test_pretrain_lm_refuses_a_pretrained_lm_in_one_line(tmp_path, capsys):
    assert main(["pretrain-lm", "--out", str(tmp_path / "lm"), "language.model=gpt2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: language.model='gpt2' is not allowed here: pretrain-lm builds "
                                               "a tiny LM from scratch (language.family, hidden_size, num_layers, "
                                               "num_heads, vocab_size)")
    assert not (tmp_path / "lm").exists()
