import pytest

from vlmlab.config import DataConfig
from vlmlab.data import load_examples
from vlmlab.data.captions import caption_examples, captions_of, read_flickr8k, read_karpathy
from vlmlab.data.records import MissingFiles


def test_karpathy_splits(karpathy_root, capsys):
    train = read_karpathy(karpathy_root, "train")  # Karpathy's train + restval, one example per caption
    assert len(train) == 3 * 5 and {e.image_id for e in train} == {"coco-1", "coco-2", "coco-3"}
    same_image = [e for e in train if e.image_id == "coco-1"]
    assert [e.target for e in same_image] == [f"A red picture number {n}." for n in range(5)]
    assert all(sorted(e.answers) == sorted(same_image[0].answers) for e in same_image)  # all 5 as references
    assert len({e.example_id for e in train}) == len(train)
    assert train[-1].image == str(karpathy_root / "val2014" / "COCO_val2014_000000000003.jpg")

    test = read_karpathy(karpathy_root / "dataset_coco.json", "test")  # the file itself works too
    assert len(test) == 1 and test[0].is_caption and len(test[0].answers) == 5 and test[0].example_id == "coco-5"
    assert "image COCO_val2014_000000000006.jpg: skipped, no caption" in capsys.readouterr().err
    with pytest.raises(MissingFiles, match="dataset_coco.json"):
        read_karpathy(karpathy_root / "val2014", "val")


def test_flickr8k_token_and_split_files(flickr8k_root, capsys):
    train = read_flickr8k(flickr8k_root, "train")
    assert len(train) == 3 * 5 and train[0].image_id == "flickr8k-1000_abc0.jpg"
    assert train[0].target == "A dog number 0 runs , caption 0 ." and train[0].image.endswith(
        "Flicker8k_Dataset/1000_abc0.jpg")
    test = read_flickr8k(flickr8k_root, "test")
    assert len(test) == 1 and len(test[0].answers) == 5
    err = capsys.readouterr().err
    assert "line 4: skipped, not <image>#<n><tab><caption>" in err and "1005_abc5.jpg: skipped, no caption" in err
    (flickr8k_root / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(MissingFiles, match="Flickr_8k.devImages.txt"):
        read_flickr8k(flickr8k_root, "val")


def test_hub_caption_spellings():
    assert captions_of({"sentences": [{"raw": "a"}, {"raw": "b"}]}) == ["a", "b"]
    assert captions_of({"caption": "one"}) == ["one"]
    assert captions_of({"caption_1": "b", "caption_0": "a", "caption_10": "k", "image_id": 3}) == ["a", "b", "k"]
    with pytest.raises(ValueError, match="no caption"):
        caption_examples(["  ", None], "x.png", "x", "val")


def test_load_by_spec(karpathy_root, flickr8k_root):
    assert len(load_examples(f"coco-captions:{karpathy_root}", "val", DataConfig())) == 1
    assert len(load_examples(f"flickr8k:{flickr8k_root}", "val", DataConfig())) == 1
