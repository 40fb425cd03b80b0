"""`vlmlab bench` on a tiny preset: both sides run, the JSON has the ratios, the peer mirrors the architecture;
presets BLIP-2 cannot mirror are refused before anything is built."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, Blip2ForConditionalGeneration

from vlmlab.bench import _blip2_config, plan
from vlmlab.cli import main
from vlmlab.config import ConfigError, apply_overrides
from vlmlab.connectors import build_connector
from vlmlab.presets import get_preset
from vlmlab.test_model import SMALL
from vlmlab.vision import VisionTower

RATIOS = ("train_speedup_vs_hf", "train_speedup_vs_hf_first_epoch", "generate_speedup_vs_hf",
          "peak_memory_ratio_vs_hf")


def test_bench_runs_both_sides_and_prints_the_ratios(capsys):
    assert main(["bench", "--json", "--cpu-time", "--steps", "1", "--epochs", "2", "--preset", "tiny-qformer",
                 "--questions-per-image", "2", *SMALL, "train.batch_size=4", "eval.max_new_tokens=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions_per_image"] == 2.0  # vlmlab trains and generates with its images shared
    assert all(result[key] > 0 for key in RATIOS)
    ours, peer = result["vlmlab"], result["transformers_blip2"]
    for side in (ours, peer):
        assert side["train_samples_per_second_later_epochs"] > 0 and side["peak_memory_bytes"] > 2**20
    assert result["train_speedup_vs_hf"] == pytest.approx(
        ours["train_samples_per_second_later_epochs"] / peer["train_samples_per_second_later_epochs"])
    assert 0.8 < ours["parameters"] / peer["parameters"] < 1.25  # the same architecture, up to its details


def test_the_peer_mirrors_the_recommended_recipe():
    parts = plan(apply_overrides(get_preset("recommended"), ["train.batch_size=2"]), steps=1, epochs=2)
    assert parts.config.vision.train == "frozen" and parts.image_size == 224
    with torch.device("meta"):  # sizes only, no weights
        tower = VisionTower(AutoModel.from_config(parts.vision), parts.config.vision.feature_layer, 224, [0.5] * 3,
                            [0.5] * 3)
        lm = AutoModelForSeq2SeqLM.from_config(parts.language)
        connector = build_connector(parts.config.connector, 1024, 768, 257)
        peer = Blip2ForConditionalGeneration(_blip2_config(parts, image_token=2))

    def count(*modules):
        return sum(p.numel() for module in modules for p in module.parameters())

    # CLIP ViT-L/14 up to the second-last of its 24 layers, whose output both read
    assert peer.config.vision_config.num_hidden_layers == 23
    assert count(tower) == pytest.approx(count(peer.vision_model), rel=1e-3)
    assert count(lm) == count(peer.language_model)  # Flan-T5-base's
    assert count(connector) == pytest.approx(count(peer.qformer, peer.language_projection), rel=0.05)
    assert peer.config.num_query_tokens == 64 and peer.config.qformer_config.cross_attention_frequency == 1


@pytest.mark.parametrize("override, message", [("connector.kind=mlp", "Q-Former"), ("language.family=gpt2", "T5"),
                                               ("vision.family=resnet", "ViT")])
def test_what_blip2_cannot_mirror_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        plan(apply_overrides(get_preset("tiny-qformer"), [*SMALL, override]), steps=1, epochs=2)


def test_questions_per_image_is_the_average_asked():
    cfg = apply_overrides(get_preset("tiny-qformer"), [*SMALL, "train.batch_size=16"])
    assert plan(cfg, steps=4, epochs=2).questions_per_image == 1.0
    assert plan(cfg, steps=4, epochs=2, questions_per_image=2).questions_per_image == 2.0
    assert 1.1 < plan(cfg, steps=4, epochs=2, questions_per_image=1.4).questions_per_image < 1.7
    with pytest.raises(ConfigError, match="between 1 and 2"):
        plan(cfg, steps=4, epochs=2, questions_per_image=3)
