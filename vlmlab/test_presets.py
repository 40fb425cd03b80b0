"""Every preset is a valid config; the real-size ones are the seed's recipes, with the parts and sizes they name
(checked on the meta device: real shapes, nothing downloaded)."""

import dataclasses

import pytest

from vlmlab.config import from_dict, validate
from vlmlab.plan import KNOWN_ARCHITECTURES, build_from_architecture
from vlmlab.presets import PRESETS, REAL_PRESETS, TINY_PRESETS, describe_presets, get_preset
from vlmlab.prompts import format_prompt
from vlmlab.tuning import check_modes

# Parameter counts of the checkpoints as published (millions): vision towers without their projection head.
PUBLISHED_M = {
    "openai/clip-vit-large-patch14": 303.2,
    "openai/clip-vit-base-patch32": 87.5,
    "google/siglip-base-patch16-224": 92.9,
    "google/flan-t5-small": 77.0,
    "google/flan-t5-base": 247.6,
    "google/flan-t5-large": 783.2,
    "gpt2": 124.4,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134.5,
    # BLIP-2 / InstructBLIP: EVA ViT-g/14 without its last block, Flan-T5-XL
    "Salesforce/blip2-flan-t5-xl": {"vision": 985.9, "language": 2849.8},
    "Salesforce/instructblip-flan-t5-xl": {"vision": 985.9, "language": 2849.8},
}
# Whole checkpoints as the hub lists them (vision + Q-Former and queries + projection + LM)
PUBLISHED_TOTAL_M = {"Salesforce/blip2-flan-t5-xl": 3942, "Salesforce/instructblip-flan-t5-xl": 4023}


def _published(name: str, part: str) -> float:
    count = PUBLISHED_M[name]
    return count[part] if isinstance(count, dict) else count


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config_that_survives_yaml(name):
    cfg = get_preset(name)
    validate(cfg)
    check_modes(cfg)
    assert from_dict(cfg.to_dict()) == cfg
    assert (name in TINY_PRESETS) == (not cfg.vision.model and not cfg.language.model)


def test_recommended_is_the_seeds_recipe():
    cfg = get_preset("recommended")
    assert (cfg.vision.model, cfg.vision.train) == ("openai/clip-vit-large-patch14", "frozen")
    assert (cfg.connector.kind, cfg.connector.num_queries) == ("qformer", 64)
    assert (cfg.language.model, cfg.language.train, cfg.language.lora_targets) == ("google/flan-t5-base", "lora",
                                                                                   "attention")
    assert format_prompt(cfg.data, "What color is the car?") == "Question: What color is the car? Answer:"
    assert cfg.eval.max_new_tokens == 10 and cfg.language.max_target_tokens >= cfg.eval.max_new_tokens
    assert (cfg.data.train, cfg.data.eval) == ("vqav2", "vqav2") and 20_000 <= cfg.data.train_size <= 50_000
    assert cfg.train.precision == "auto"  # bf16 where the GPU has it, fp16 with a loss scaler on a T4


def _differences(cfg, base) -> dict:
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items() for key, value in fields.items()
            if value != dataclasses.asdict(getattr(base, section))[key]}


@pytest.mark.parametrize("name, changed", [
    ("recommended-t5-small", {"language.model": "google/flan-t5-small"}),
    ("recommended-t5-large", {"language.model": "google/flan-t5-large"}),
    ("recommended-32-queries", {"connector.num_queries": 32}),
    ("recommended-siglip", {"vision.model": "google/siglip-base-patch16-224"}),
    ("recommended-smollm2", {"language.model": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
])
def test_each_neighbour_changes_one_part_of_the_recommended_recipe(name, changed):
    assert _differences(get_preset(name), get_preset("recommended")) == changed


def test_seed_baseline_is_clip_qformer_gpt2_captioning_in_full():
    cfg = get_preset("seed-gpt2-captions")
    assert cfg.vision.model.startswith("openai/clip-vit") and cfg.connector.kind == "qformer"
    assert (cfg.language.model, cfg.language.train) == ("gpt2", "full")
    assert (cfg.data.train, cfg.data.eval) == ("flickr8k", "flickr8k")


# One preset per distinct pair of checkpoints (32 queries instead of 64 is checked above).
@pytest.mark.parametrize("name", [name for name in REAL_PRESETS if name != "recommended-32-queries"])
def test_real_presets_build_at_their_published_sizes(name):
    cfg = get_preset(name)
    assert cfg.vision.model in KNOWN_ARCHITECTURES and cfg.language.model in KNOWN_ARCHITECTURES
    model = build_from_architecture(cfg)
    with model.vision.whole():  # the checkpoint's every block, those the feature layer sets aside included
        vision = sum(p.numel() for p in model.vision.parameters())
    language = sum(p.numel() for p in model.language.parameters() if not p.requires_grad or cfg.language.train == "full")
    assert vision / 1e6 == pytest.approx(_published(cfg.vision.model, "vision"), rel=0.01)
    assert language / 1e6 == pytest.approx(_published(cfg.language.model, "language"), rel=0.01)
    if cfg.connector.init == cfg.language.model:  # the whole checkpoint
        connector = sum(p.numel() for p in model.connector.parameters())
        assert (vision + connector + language) / 1e6 == pytest.approx(PUBLISHED_TOTAL_M[cfg.language.model], rel=0.01)
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen towers in every recipe
    trainable = sum(p.numel() for p in model.language.parameters() if p.requires_grad)
    if cfg.language.train == "lora":
        assert 0 < trainable < 0.05 * language
    queries = model.connector.query_tokens[0] if cfg.connector.init else model.connector.queries  # [M, D]
    assert queries.shape[0] == cfg.connector.num_queries


def test_the_blip2_presets_are_the_seeds_rows():
    as_is, finetune = get_preset("blip2-as-is"), get_preset("instructblip-finetune")
    assert (as_is.vision.train, as_is.language.train, as_is.eval.num_beams) == ("frozen", "frozen", 5)
    assert (finetune.vision.train, finetune.language.train, finetune.connector.kind) == ("frozen", "lora",
                                                                                        "instructblip")
    assert format_prompt(finetune.data, "What color?") == "Question: What color? Short answer:"
    pretrained = get_preset("recommended-pretrained-qformer")
    assert _differences(pretrained, get_preset("recommended")).keys() == {
        f"connector.{key}" for key in ("kind", "num_queries", "num_layers", "init")}


def test_presets_are_listed_one_line_each():
    lines = describe_presets()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert all(len(line.split()) > 3 for line in lines)
