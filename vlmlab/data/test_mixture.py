from collections import Counter

import pytest

from vlmlab.config import ConfigError, DataConfig
from vlmlab.data import Part, load_examples, parse_spec
from vlmlab.data.example import Example
from vlmlab.data.mixture import apportion, mix, subset


def vqa(n_yes: int, n_number: int, n_other: int, prefix: str = "") -> list[Example]:
    kinds = ["yes/no"] * n_yes + ["number"] * n_number + ["other"] * n_other
    return [Example(f"{prefix}{i}.png", f"q{i}?", ["a"], "vqa", f"{prefix}img{i}", f"{prefix}{i}", answer_type=kind)
            for i, kind in enumerate(kinds)]


def test_apportion_sums_exactly():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [3, 1]) == [5, 2]
    assert sum(apportion(20_000, [38.0, 12.5, 49.5])) == 20_000


def test_subset_is_stratified_deterministic_and_ordered():
    examples = vqa(380, 125, 495)
    picked = subset(examples, 200, seed=3)
    assert Counter(e.answer_type for e in picked) == {"yes/no": 76, "number": 25, "other": 99}
    assert picked == subset(examples, 200, seed=3) and picked != subset(examples, 200, seed=4)
    positions = [examples.index(e) for e in picked]
    assert positions == sorted(positions) and len(set(positions)) == 200
    assert subset(examples, 5000, seed=0) == examples


def test_mixture_weights_and_repeats():
    big, small = vqa(60, 0, 0, "b"), vqa(0, 0, 10, "s")
    mixed = mix([(big, 3.0), (small, 1.0)], total=80, seed=0, repeat=True)
    assert len(mixed) == 80
    assert Counter(e.answer_type for e in mixed) == {"yes/no": 60, "other": 20}  # small repeated twice
    assert mixed[0].image_id.startswith("0:") and mixed[-1].image_id.startswith("1:")
    once = mix([(big, 3.0), (small, 1.0)], total=80, seed=0, repeat=False)  # evaluation: never repeated
    assert Counter(e.answer_type for e in once) == {"yes/no": 60, "other": 10}


def test_spec_parsing(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    assert parse_spec(f"vqav2:/data/vqa@3,coco-captions@1.5, {tmp_path / 'a.jsonl'}") == [
        Part("vqav2", "/data/vqa", 3.0), Part("coco-captions", "", 1.5), Part("jsonl", str(tmp_path / "a.jsonl"), 1.0)]
    assert parse_spec("synthetic") == [Part("synthetic", "", 1.0)]
    with pytest.raises(ConfigError, match="unknown dataset 'vqa2'; valid: synthetic, jsonl, vqav2"):
        parse_spec("vqa2")
    with pytest.raises(ConfigError, match="positive"):
        parse_spec("synthetic@0")


def test_synthetic_mixture_through_load_examples():
    data = DataConfig(train_images=6, eval_images=4, train_size=30)
    mixed = load_examples("synthetic@2,synthetic@1", "train", data)
    assert len(mixed) == 30 and Counter(e.image_id.split(":")[0] for e in mixed) == {"0": 20, "1": 10}
    with pytest.raises(ConfigError, match="unknown split"):
        load_examples("synthetic", "validation", data)
