"""The feature cache: keys that change with everything features depend on, features equal to the tower's,
reuse across runs, recomputation when the key or an image changes, unreadable images, and the config rule."""

import dataclasses

import pytest
import torch
from PIL import Image

from vlmlab.config import ConfigError, DataConfig
from vlmlab.data.batching import ExampleDataset, collate
from vlmlab.data.synthetic import make_split
from vlmlab.distributed import Processes
from vlmlab.feature_cache import (FeatureDataset, FeatureStore, cache_wanted, collate_features, fill, image_hash,
                                  tower_key, training_data)
from vlmlab.images import ImagePrep
from vlmlab.model import build_vlm
from vlmlab.test_model import small
from vlmlab.prompts import training_texts


@pytest.fixture(scope="module")
def examples():
    return make_split("train", 6, questions_per_image=2)


@pytest.fixture(scope="module")
def model(examples):
    cfg = small("default", "vision.train=frozen")
    return build_vlm(cfg, training_texts(examples, cfg.data)).eval()


def _all(examples):
    return [list(range(len(examples)))]


def test_cache_is_on_for_a_frozen_tower_without_augmentation(model):
    cfg = small("default")
    assert not cache_wanted(cfg)  # the tower trains: its features change every step
    cfg.vision.train = "frozen"
    assert cache_wanted(cfg)
    cfg.data.random_resize = 0.8  # augmentation: every visit sees other pixels
    assert not cache_wanted(cfg)
    cfg.train.feature_cache = "on"
    with pytest.raises(ConfigError, match="random_resize"):
        cache_wanted(cfg)
    cfg.data.random_resize, cfg.train.feature_cache = 1.0, "off"
    assert not cache_wanted(cfg)


def test_key_follows_weights_layer_preprocessing_and_precision(model):
    prep = ImagePrep(model.vision.image_size)
    key, recipe = tower_key(model.vision, prep, None)
    assert key == tower_key(model.vision, ImagePrep(model.vision.image_size), None)[0]  # stable
    assert recipe["feature_layer"] == -1 and recipe["precision"] == "fp32"
    others = [tower_key(model.vision, dataclasses.replace(prep, resize="pad"), None)[0],
              tower_key(model.vision, prep, torch.bfloat16)[0]]
    model.vision.feature_layer = -2
    others.append(tower_key(model.vision, prep, None)[0])
    model.vision.feature_layer = -1
    weight = next(model.vision.model.parameters())
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
        others.append(tower_key(model.vision, prep, None)[0])
        weight.view(-1)[0] -= 1e-3
    assert len({key, *others}) == 5


def test_image_hash_follows_content(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    same = Image.new("RGB", (8, 8), "red")
    assert image_hash(image) == image_hash(same)
    same.putpixel((3, 3), (255, 0, 1))
    assert image_hash(image) != image_hash(same)
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png")
    assert image_hash(str(tmp_path / "a.png")) == image_hash(tmp_path / "b.png")  # renamed: same content


def test_features_match_the_tower_and_are_reused(model, examples, tmp_path):
    cfg = small("default", "vision.train=frozen", f"train.feature_cache_dir={tmp_path}")
    dataset, collate_fn = training_data(model, examples, cfg, tmp_path, _all(examples), None, Processes())
    assert isinstance(dataset, FeatureDataset) and collate_fn is collate_features and not dataset.failed
    cached = collate_fn([dataset[i] for i in range(4)])
    plain = collate([ExampleDataset(examples, cfg.data, model.vision.image_size)[i] for i in range(4)])
    assert cached["features"].dtype == torch.float16 and torch.equal(cached["image_index"], plain["image_index"])
    with torch.no_grad():
        expected = model.vision(plain["pixels"])
        torch.testing.assert_close(cached["features"].float(), expected, atol=2e-3, rtol=2e-3)
        loss_from_pixels = model(plain["pixels"], plain["prompts"], plain["targets"], plain["image_index"])
        loss_from_cache = model(None, cached["prompts"], cached["targets"], cached["image_index"],
                                features=cached["features"])
    torch.testing.assert_close(loss_from_cache, loss_from_pixels, atol=1e-3, rtol=1e-3)

    folder = next(tmp_path.glob("*/recipe.json")).parent
    images = {image_hash(e.image): e.image for e in examples}
    assert fill(FeatureStore(folder), model.vision, ImagePrep(model.vision.image_size), images, 4, None,
                Processes()) == 0  # a second run computes nothing
    edited = examples[0].image.copy()
    edited.putpixel((0, 0), (1, 2, 3))
    assert fill(FeatureStore(folder), model.vision, ImagePrep(model.vision.image_size), {image_hash(edited): edited},
                4, None, Processes()) == 1  # an edited image is computed again


def test_a_changed_key_uses_a_fresh_folder(model, examples, tmp_path):
    cfg = small("default", "vision.train=frozen", f"train.feature_cache_dir={tmp_path}")
    training_data(model, examples, cfg, tmp_path, _all(examples), None, Processes())
    cfg.data.image_resize = "pad"
    training_data(model, examples, cfg, tmp_path, _all(examples), None, Processes())
    folders = sorted(tmp_path.glob("*/recipe.json"))
    assert len(folders) == 2 and all(len(list(f.parent.glob("shard-*.npy"))) == 1 for f in folders)


def test_only_planned_images_are_computed_and_unreadable_ones_fail(model, examples, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data = [*examples, dataclasses.replace(examples[0], image=str(broken), image_id="broken")]
    cfg = small("default", "vision.train=frozen")
    first_image = [i for i, e in enumerate(data) if e.image_id == data[0].image_id]
    dataset, _ = training_data(model, data, cfg, tmp_path, [first_image], None, Processes())
    assert len(dataset.store.rows) == 1  # a run that visits one image computes one
    dataset, _ = training_data(model, data, cfg, tmp_path, _all(data), None, Processes())
    assert dataset.failed == {"broken"} and dataset[len(data) - 1] is None
    assert len(dataset.store.rows) == len({e.image_id for e in examples})
    assert DataConfig().random_resize == 1.0  # the default trains from the cache when the tower is frozen
