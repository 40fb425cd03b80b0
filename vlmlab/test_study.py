"""Study files: checked before anything runs, expanded into variants, ordered by what each starts from."""

import pytest

from vlmlab.study import (REFERENCE, StudyError, config_changes, config_fields, find_study, load_study,
                          shipped_studies, study_argument, with_sweep_settings)

STUDY = """
name: queries-and-prompts
base:
  preset: default
  overrides: [train.max_steps=600]
seeds: [0, 1, 2]
design: {design}
axes:
  queries:
    q16: [connector.num_queries=16]
    q64: [connector.num_queries=64]
  prompt:
    plain: [data.prompt=none]
    instruct: [data.prompt=instruct]
"""


def write(tmp_path, text: str, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_one_at_a_time_changes_one_axis_from_the_reference(tmp_path):
    study = load_study(write(tmp_path, STUDY.format(design="one-at-a-time")))
    variants = study.variants()
    assert list(variants) == [REFERENCE, "q64", "instruct"] and study.reference == REFERENCE
    assert variants[REFERENCE].overrides == ["connector.num_queries=16", "data.prompt=none"]
    assert variants["q64"].overrides == ["connector.num_queries=64", "data.prompt=none"]
    assert variants["instruct"].levels == {"queries": "q16", "prompt": "instruct"}
    cfg, overrides = study.run_config(variants["q64"], seed=2)
    assert (cfg.connector.num_queries, cfg.data.prompt, cfg.train.max_steps, cfg.train.seed) == (64, "none", 600, 2)
    assert overrides[-1] == "train.seed=2" and study.source_args() == ["--preset", "default"]


def test_grid_names_every_combination_by_its_levels(tmp_path):
    study = load_study(write(tmp_path, STUDY.format(design="grid")))
    assert list(study.variants()) == ["q16+plain", "q16+instruct", "q64+plain", "q64+instruct"]
    assert study.reference == "q16+plain"
    assert study.variants()["q64+instruct"].overrides == ["connector.num_queries=64", "data.prompt=instruct"]


def test_a_variant_starting_from_another_runs_after_it(tmp_path):
    text = """
name: caption-then-vqa
axes:
  start:
    vqa: [data.captions=false]
    from_captions: [data.captions=false, train.init_from=@captions]
    captions: [data.questions_per_image=0]
"""
    variants = load_study(write(tmp_path, text)).variants()
    assert list(variants) == [REFERENCE, "captions", "from_captions"]
    assert variants["from_captions"].starts_from == "captions" and variants["captions"].starts_from is None


@pytest.mark.parametrize("text, message", [
    ("name: s\nfoo: 1\n", "unknown key 'foo'; valid: name"),
    ("name: s\nbase: {preset: default, overide: []}\n", "base: unknown key 'overide'"),
    ("name: s\naxes:\n  q:\n    a: [connector.num_querie=4]\n", "axes.q.a: unknown config key 'connector.num_querie'"),
    ("name: s\naxes:\n  q:\n    a: [connector.num_queries=four]\n", "axes.q.a: connector.num_queries expects int"),
    ("name: s\naxes:\n  q:\n    a: [connector.num_queries=0]\n", "axes.q.a: connector.num_queries=0 is not allowed"),
    ("name: s\naxes:\n  q:\n    a: []\n    a: [train.lr=1e-3]\n", "line 5: 'a' appears twice"),
    ("name: s\naxes:\n  q: {a: []}\n  p: {a: []}\n", "level name 'a' is also a level of axis 'q'"),
    ("name: s\naxes:\n  q: {reference: []}\n", "'reference' names the variant"),
    ("name: s\naxes:\n  q: {a+b: []}\n", "axes.q.a+b: a level name is a word"),
    ("name: s\naxes:\n  q: {a: connector.num_queries=4}\n", "must be a list of section.field=value"),
    ("name: s\naxes:\n  q: {a: [train.seed=3]}\n", "train.seed is set by the sweep"),
    ("name: s\naxes:\n  q: {a: [], b: [train.init_from=@nowhere]}\n", "train.init_from=@nowhere names no variant"),
    ("name: s\naxes:\n  q: {a: [], b: [train.init_from=@c], c: [train.init_from=@b]}\n", "goes round in a circle"),
    ("name: s\naxes:\n  q: {a: [], b: [train.lr=1e-3]}\n", "variants reference and b resolve to the same config"),
    ("name: s\ndesign: random\n", "design 'random' is not known; valid: one-at-a-time, grid"),
    ("name: s\nseeds: [0, 0]\n", "seeds must be a list of distinct integers"),
    ("name: s\nbase: {preset: nonesuch}\n", "base: unknown preset 'nonesuch'"),
    ("name: s\nbase: {config: missing.yaml}\n", "base: config file not found"),
    ("name: two words\n", "name must be a word"),
    ("name: s\naxes: [a, b]\n", "axes must be a mapping"),
    ("name: [s\n", "is not valid YAML"),
])
def test_a_mistake_is_one_line_naming_its_place(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(StudyError) as caught:
        load_study(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_base_config_file_is_read_beside_the_study(tmp_path):
    write(tmp_path, "train:\n  max_steps: 7\n", "base.yaml")
    study = load_study(write(tmp_path, "name: s\nbase: {config: base.yaml}\n"))
    cfg, _ = study.run_config(study.variants()[REFERENCE], 0)
    assert cfg.train.max_steps == 7 and study.source_args() == ["--preset", "default", "--config",
                                                                 str(tmp_path / "base.yaml")]


def test_a_change_is_any_field_but_where_the_numbers_are_sent(tmp_path):
    study = load_study(write(tmp_path, STUDY.format(design="one-at-a-time")))
    reference = study.variants()[REFERENCE]
    first, second = (config_fields(study.run_config(reference, 0)[0]) for _ in range(2))
    assert config_changes(first, second) == []
    cfg = study.run_config(reference, 0)[0]
    cfg.eval.num_beams, cfg.train.report_to = 2, "tensorboard"
    assert config_changes(first, config_fields(cfg)) == ["eval.num_beams: 1 -> 2"]
    # A field added to vlmlab since the run began is no change while it keeps the default the run had.
    older = {key: value for key, value in first.items() if key != "data.random_resize"}
    assert config_changes(older, second) == []
    assert config_changes(older, {**second, "data.random_resize": 0.5}) == ["data.random_resize: 1.0 -> 0.5"]


def test_every_shipped_study_is_valid():
    names = shipped_studies()
    assert "conditioning" in names and all(names.values())
    for name in names:
        path = find_study(name)
        for scale in load_study(path).scales or [None]:
            study = load_study(path, scale)
            for variant in study.variants().values():
                study.run_config(variant, study.seeds[0])
    with pytest.raises(StudyError, match="shipped studies: .*conditioning"):
        find_study("nonesuch")


def test_a_shipped_study_is_given_again_by_name_and_any_other_by_its_path(tmp_path):
    # The report's Reproduce line: a shipped file's path is inside this machine's installed package.
    assert study_argument(find_study("conditioning")) == "conditioning"
    own = write(tmp_path, STUDY.format(design="grid"), name="conditioning.yaml")
    assert study_argument(own) == str(own)


SCALED = """
name: scaled
base:
  overrides: [train.max_steps=50]
scales:
  tiny:
    overrides: [language.model=@prepared/lm, language.train=lora]
    prepare: {lm: [pretrain-lm, --family, t5, --steps, "3"]}
  colab:
    preset: recommended
axes:
  queries:
    q16: [connector.num_queries=16]
    q8: [connector.num_queries=8]
  lm:
    own: []
    gpt2: {colab: [language.model=gpt2]}
"""


def test_a_scale_lays_its_base_over_the_common_one_and_drops_levels_it_lacks(tmp_path):
    path = write(tmp_path, SCALED)
    tiny = load_study(path)  # the first scale listed is the default
    assert (tiny.scale, tiny.scales, tiny.preset) == ("tiny", ["tiny", "colab"], "default")
    assert tiny.overrides == ["train.max_steps=50", "language.model=@prepared/lm", "language.train=lora"]
    assert list(tiny.variants()) == [REFERENCE, "q8"] and tiny.absent == {"gpt2": "lm"}
    assert tiny.prepare_command("lm", tmp_path / "out") == [
        "pretrain-lm", "--out", str(tmp_path / "out" / "prepared" / "lm"), "--family", "t5", "--steps", "3"]
    colab = load_study(path, scale="colab")
    assert (colab.preset, colab.prepare, colab.absent) == ("recommended", {}, {})
    assert list(colab.variants()) == [REFERENCE, "q8", "gpt2"]
    assert colab.variants()["gpt2"].overrides == ["connector.num_queries=16", "language.model=gpt2"]
    assert "[scales: tiny, colab]" not in shipped_studies().get("scaled", "")  # only shipped files are listed


def test_a_prepared_part_resolves_to_its_folder_under_the_sweep(tmp_path):
    study = load_study(write(tmp_path, SCALED))
    overrides = study.run_config(study.variants()[REFERENCE], 0)[1]
    resolved = with_sweep_settings(overrides, tmp_path / "out", 0, tmp_path / "out" / "runs")
    assert f"language.model={tmp_path / 'out' / 'prepared' / 'lm'}" in resolved
    assert study.variants()[REFERENCE].starts_from is None  # a prepared part orders no run


@pytest.mark.parametrize("replace, message", [
    (("scale: ", "scale: "), None),
    (("@prepared/lm", "@prepared/tokenizer"), "@prepared/tokenizer names no prepared part at scale tiny; "
                                              "prepared: lm"),
    (("[pretrain-lm,", "[train,"), "scales.tiny.prepare.lm must be a list of words starting with pretrain-lm"),
    (('"3"]', '"3", --out, x]'), "scales.tiny.prepare.lm: --out is set by the sweep"),
    (("{colab: [", "{kaggle: ["), "axes.lm.gpt2: a level's mapping is scale -> overrides; no scale 'kaggle' (scales: tiny, colab)"),
    (("    preset: recommended", "    preset: recommended\n    seeds: [1]"), "scales.colab: unknown key 'seeds'"),
])
def test_a_mistake_in_scales_or_prepared_parts_is_one_line(tmp_path, replace, message):
    path = write(tmp_path, SCALED.replace(*replace))
    if message is None:
        with pytest.raises(StudyError, match="no scale 'kaggle'; scales: tiny, colab"):
            load_study(path, scale="kaggle")
        return
    with pytest.raises(StudyError) as caught:
        load_study(path, scale="colab" if "seeds" in message else None)
    assert message in str(caught.value) and "\n" not in str(caught.value)
