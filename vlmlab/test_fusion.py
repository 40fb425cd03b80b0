"""Gated cross-attention fusion: exact identity at init, generation with the KV cache and beams, trainable gates
when the LM is frozen or LoRA-tuned, and a save -> load round trip."""

import pytest
import torch

from vlmlab import VLM
from vlmlab.config import ConfigError, LanguageConfig, apply_overrides
from vlmlab.fusion import decoder_layers
from vlmlab.language import build_language
from vlmlab.tokenizer import train_tokenizer

TEXTS = ["what color is the circle?", "red", "blue", "a large red circle and a small blue square", "yes", "no"]
PROMPTS = ["Question: what color is the circle? Answer:", "A short caption:"]
TARGETS = ["red", "a large red circle and a small blue square"]


def fused_lm(family="gpt2", every=1, num_layers=2):
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    cfg = LanguageConfig(family=family, hidden_size=32, num_layers=num_layers, num_heads=2,
                         fusion="cross_attention", cross_attention_every=every)
    return build_language(cfg, tokenizer).eval()


def open_gates(lm, value=1.0):
    with torch.no_grad():
        for block in lm.fusion.blocks:
            block.attention_gate.fill_(value)
            block.ff_gate.fill_(value)


def logits(lm, visual):
    prompts, targets = lm.encode_prompts(PROMPTS), lm.encode_targets(TARGETS)
    return lm(visual, prompts, targets).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_closed_gates_leave_the_lm_unchanged_and_open_ones_read_the_image(family):
    lm = fused_lm(family)
    visual_a, visual_b = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    # Text only: the sequence has no visual prefix.
    inputs = lm.training_inputs(visual_a, lm.encode_prompts(PROMPTS), lm.encode_targets(TARGETS))
    assert inputs["inputs_embeds"].shape[1] == max(len(p) + len(t) for p, t in
                                                   zip(lm.encode_prompts(PROMPTS), lm.encode_targets(TARGETS)))
    assert torch.equal(logits(lm, visual_a), logits(lm, visual_b)), "gates start at zero: the image has no effect"
    open_gates(lm)
    assert not torch.allclose(logits(lm, visual_a), logits(lm, visual_b)), "open gates let the image in"


def test_blocks_sit_before_every_kth_layer():
    lm = fused_lm(num_layers=5, every=2)
    assert lm.fusion.layer_indices == [0, 2, 4]
    assert len(lm.fusion.blocks) == 3
    assert len(decoder_layers(lm.model)) == 5


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_kv_cache_matches_without_and_batches_match_singles(num_beams):
    lm = fused_lm()
    open_gates(lm, 0.8)
    visual = torch.randn(2, 3, 32) * 3
    prompts = lm.encode_prompts(PROMPTS)
    batched = lm.generate(visual, prompts, max_new_tokens=8, num_beams=num_beams)
    singles = [lm.generate(visual[i : i + 1], prompts[i : i + 1], 8, num_beams=num_beams)[0] for i in range(2)]
    assert batched == singles
    lm.model.generation_config.use_cache = False
    assert lm.generate(visual, prompts, max_new_tokens=8, num_beams=num_beams) == batched


def test_encoder_decoder_refuses_cross_attention_fusion():
    with pytest.raises(ConfigError, match="decoder-only"):
        fused_lm("t5")
    with pytest.raises(ConfigError, match="prefix, cross_attention"):
        build_language(LanguageConfig(family="gpt2", hidden_size=32, num_layers=1, num_heads=2, fusion="sideways"),
                       train_tokenizer(TEXTS, vocab_size=300))


def _gate_gradients(model) -> list[float]:
    return [float(block.attention_gate.grad.abs()) for block in model.language.fusion.blocks]


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_frozen_or_lora_lm_keeps_gates_trainable(mode, tiny_vlm, pretrained_gpt2):
    model, batch = tiny_vlm(f"language.model={pretrained_gpt2}", f"language.train={mode}")
    base = [p for name, p in model.language.model.named_parameters() if "lora_" not in name]
    assert not any(p.requires_grad for p in base)
    assert all(p.requires_grad for p in model.language.fusion.parameters())
    model.eval()  # no adapter dropout: only the gates differ between the two passes
    with torch.no_grad():
        before = model(*batch)
        open_gates(model.language, 0.5)
        assert not torch.equal(before, model(*batch)), "the hooks run inside a frozen or peft-wrapped LM"
        open_gates(model.language, 0.0)
    model(*batch).backward()
    assert all(g > 0 for g in _gate_gradients(model)), "the closed gates get a gradient"


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_save_load_round_trip(mode, tiny_vlm, pretrained_gpt2, tmp_path):
    by_path = [] if mode == "full" else [f"language.model={pretrained_gpt2}", f"language.train={mode}"]
    model, batch = tiny_vlm(*by_path)
    open_gates(model.language, 0.5)
    model.eval().save(tmp_path / "model")
    loaded = VLM.load(tmp_path / "model", device="cpu")
    assert loaded.language.fusion.gates() == model.language.fusion.gates()
    with torch.no_grad():
        assert torch.equal(model(*batch), loaded(*batch))
    pixels, prompts, _ = batch
    assert model.generate(pixels, prompts, 6) == loaded.generate(pixels, prompts, 6)


@pytest.fixture(scope="module")
def examples():
    from vlmlab.data.synthetic import make_split

    return make_split("train", 4, questions_per_image=1)


@pytest.fixture
def pretrained_gpt2(examples, tmp_path):
    """A tiny GPT-2 saved with save_pretrained, loaded by path as a hub name would be."""
    from vlmlab.config import DataConfig
    from vlmlab.prompts import training_texts

    tokenizer = train_tokenizer(training_texts(examples, DataConfig()), vocab_size=400)
    build_language(LanguageConfig(family="gpt2", hidden_size=32, num_layers=1, num_heads=2), tokenizer).save(
        tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.fixture
def tiny_vlm(examples):
    from vlmlab.config import DataConfig
    from vlmlab.model import build_vlm
    from vlmlab.presets import get_preset
    from vlmlab.prompts import format_prompt
    from vlmlab.test_model import SMALL
    from vlmlab.prompts import training_texts

    def build(*overrides):
        torch.manual_seed(0)
        cfg = apply_overrides(get_preset("tiny-gpt2"), [*SMALL, "language.fusion=cross_attention", *overrides])
        model = build_vlm(cfg, training_texts(examples, DataConfig()))
        pixels = model.pixels_of([e.image for e in examples])
        prompts = [format_prompt(cfg.data, e.question) for e in examples]
        return model, (pixels, prompts, [e.target for e in examples])

    return build
