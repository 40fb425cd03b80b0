"""The composed VLM: every preset builds, save -> load is exact, batched generation equals one at a time,
and a model can overfit one batch (so gradients reach every part)."""

import pytest
import torch

from vlmlab import VLM
from vlmlab.config import Config, ConfigError, DataConfig, apply_overrides
from vlmlab.data.synthetic import make_split
from vlmlab.model import build_vlm, describe_parts
from vlmlab.presets import TINY_PRESETS, get_preset
from vlmlab.prompts import training_texts

SMALL = ["vision.hidden_size=32", "vision.num_layers=1", "vision.num_heads=2", "connector.hidden_size=32",
         "connector.num_queries=4", "connector.num_layers=1", "connector.num_heads=2", "language.hidden_size=32",
         "language.num_layers=1", "language.num_heads=2", "language.vocab_size=400"]


@pytest.fixture(scope="module")
def examples():
    return make_split("train", 12, questions_per_image=2)


def small(preset: str, *overrides: str) -> Config:
    return apply_overrides(get_preset(preset), [*SMALL, *overrides])


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_every_preset_builds_at_its_real_size(preset, examples):
    model = build_vlm(get_preset(preset), training_texts(examples, DataConfig()))
    lines = describe_parts(model)
    assert [line.split()[0] for line in lines] == ["vision", "connector", "language"]
    pixels = model.pixels_of([e.image for e in examples[:2]])
    per_feature = model.config.connector.kind in ("mlp", "linear")  # one token per feature, else one per query
    visual = model.config.connector.num_queries if not per_feature else model.vision.feature_layout()[0]
    assert model.visual_tokens(pixels).shape == (2, visual, model.language.hidden_size)


def test_frozen_parts_get_no_gradient(examples):
    model = build_vlm(small("default", "vision.train=frozen"), training_texts(examples, DataConfig()))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert "frozen" in describe_parts(model)[0] and " 0.00M trainable" in describe_parts(model)[0]
    with pytest.raises(ConfigError, match="full, frozen"):
        build_vlm(small("default", "language.train=partly"), training_texts(examples, DataConfig()))


def _batch(model, examples):
    from vlmlab.prompts import format_prompt

    pixels = model.pixels_of([e.image for e in examples])
    prompts = [format_prompt(model.config.data, e.question) for e in examples]
    return pixels, prompts, [e.target for e in examples]


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_save_load_gives_identical_outputs(preset, examples, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(small(preset), training_texts(examples, DataConfig())).eval()
    pixels, prompts, targets = _batch(model, examples[:4])
    model.save(tmp_path / "model")
    loaded = VLM.load(tmp_path / "model", device="cpu")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(pixels, prompts, targets), loaded(pixels, prompts, targets))
    assert model.generate(pixels, prompts, 6) == loaded.generate(pixels, prompts, 6)


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_at_a_time(preset, num_beams, examples):
    torch.manual_seed(2)
    model = build_vlm(small(preset), training_texts(examples, DataConfig())).eval()
    # Prompts of different lengths, so padding really happens (left for causal LMs, right for T5's encoder).
    chosen = [examples[0], examples[1], examples[5], examples[6]]
    pixels, prompts, _ = _batch(model, chosen)
    assert len({len(p) for p in prompts}) > 1
    # At least 3 new tokens: a random model may well say EOS first, which would make the comparison empty.
    batched = model.generate(pixels, prompts, 8, num_beams=num_beams, min_new_tokens=3)
    single = [model.generate(pixels[i : i + 1], prompts[i : i + 1], 8, num_beams=num_beams, min_new_tokens=3)[0]
              for i in range(4)]
    assert batched == single
    assert any(text for text in batched), "a random tiny model still says something"


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_overfits_one_batch(preset, examples):
    torch.manual_seed(0)
    model = build_vlm(small(preset, "connector.num_queries=8"), training_texts(examples, DataConfig()))
    chosen = [e for e in examples if not e.is_caption][:6]
    pixels, prompts, targets = _batch(model, chosen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = model(pixels, prompts, targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first
    model.eval()
    assert model.generate(pixels, prompts, 5) == targets
    # The gradient reached the first layer of the vision tower, through the connector, from the LM's loss.
    assert all(p.grad.abs().sum() > 0 for p in model.connector.parameters())
    first_layer = next(p for name, p in model.vision.named_parameters() if "embed" in name)
    assert first_layer.grad.abs().sum() > 0


def test_ask_and_caption_take_paths_and_pil_images(examples, tmp_path):
    model = build_vlm(small("default"), training_texts(examples, DataConfig())).eval()
    examples[0].image.save(tmp_path / "x.png")
    for image in (examples[0].image, tmp_path / "x.png", str(tmp_path / "x.png")):
        assert isinstance(model.ask(image, "what color is the circle?"), str)
        assert isinstance(model.caption(image), str)
    with pytest.raises(ValueError, match="empty"):
        model.ask(examples[0].image, "   ")


def test_merged_cells_with_coordinates_build_save_and_load(examples, tmp_path):
    torch.manual_seed(0)
    config = small("default", "connector.merge=2", "connector.coords=true", "vision.image_size=32")
    model = build_vlm(config, training_texts(examples, DataConfig())).eval()
    pixels, prompts, targets = _batch(model, examples[:2])
    num_features = model.vision.feature_layout()[0]
    assert model.visual_tokens(pixels).shape == (2, num_features // 4, model.language.hidden_size)
    model.save(tmp_path / "model")
    loaded = VLM.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(pixels, prompts, targets), loaded(pixels, prompts, targets))
