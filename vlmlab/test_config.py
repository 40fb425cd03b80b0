import pytest

from vlmlab.config import Config, ConfigError, apply_overrides, load_config, merge_config_file, save_config
from vlmlab.presets import PRESETS, get_preset


def test_overrides_are_parsed_to_the_field_type():
    cfg = apply_overrides(Config(), ["train.max_steps=12", "train.lr=3e-4", "eval.caption_metrics=false",
                                     "language.model=/some/path", "connector.kind=perceiver"])
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.eval.caption_metrics is False
    assert cfg.language.model == "/some/path"
    assert cfg.connector.kind == "perceiver"


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["train.max_step=5"])
    message = str(err.value)
    assert "train.max_step" in message and "max_steps" in message and "batch_size" in message


def test_unknown_section_names_the_sections():
    with pytest.raises(ConfigError, match="vision, connector, language, data, train, eval"):
        apply_overrides(Config(), ["optim.lr=1"])


@pytest.mark.parametrize("item", ["train.max_steps=ten", "eval.caption_metrics=maybe", "train.lr=fast"])
def test_bad_values_name_the_key_and_type(item):
    with pytest.raises(ConfigError, match=item.split("=")[0]):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("overrides, message", [
    (["data.image_split=true", "data.image_split_fraction=1.5"], r"must be in \[0, 1\]"),
    (["data.image_split_fraction=0.5"], "applies with data.image_split=true"),
    (["connector.kind=mlp", "data.image_split=true", "data.image_split_fraction=0.5"], "needs connector.kind=qformer"),
    (["connector.kind=linear", "data.image_split=true", "eval.image_split=false"], "eval.image_split=False"),
])
def test_splitting_some_images_is_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_splitting_some_images_or_none_at_evaluation_is_a_resamplers_option():
    for kind in ("qformer", "perceiver"):
        cfg = apply_overrides(Config(), [f"connector.kind={kind}", "data.image_split=true",
                                         "data.image_split_fraction=0.5", "eval.image_split=false"])
        assert cfg.data.image_split_fraction == 0.5 and cfg.eval.image_split is False
    assert apply_overrides(Config(), ["connector.kind=mlp", "eval.image_split=false"])  # no split model: a no-op


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(Config(), ["train.max_steps"])


def test_yaml_round_trip_and_merge_over_a_preset(tmp_path):
    cfg = apply_overrides(get_preset("tiny-gpt2"), ["train.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    (tmp_path / "partial.yaml").write_text("train:\n  max_steps: 3\n  lr: 1\n")
    merged = merge_config_file(tmp_path / "partial.yaml", base=get_preset("tiny-gpt2"))
    assert merged.train.max_steps == 3 and merged.train.lr == 1.0 and merged.language.family == "gpt2"


def test_yaml_with_wrong_type_or_key_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match="train.max_steps expects int"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="valid keys of train"):
        load_config(tmp_path / "bad2.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_presets_are_fresh_configs():
    for name in PRESETS:
        first, second = get_preset(name), get_preset(name)
        assert first == second and first is not second
    with pytest.raises(ConfigError, match="default"):
        get_preset("nope")
