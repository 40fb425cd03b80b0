"""Feature cache: a frozen vision tower's features computed once per image and kept on disk, memory-mapped.

Why: a frozen tower without augmentation gives an image the same features every epoch, and in the recommended
recipe (CLIP ViT-L/14 -> Q-Former -> Flan-T5-base) that tower holds about half of the parameters and most of the
forward time. With the cache the tower runs once per image (batched, no gradients) before training starts, and
every training step runs only the connector and the LM. `train.feature_cache=auto` (the default) uses it whenever
`vision.train=frozen` and `data.random_resize=1`; `on` insists (and refuses a setting it cannot serve); `off`.

Validity. Features depend on the tower (its config and every weight), the preprocessing (`ImagePrep`: size, resize
mode, splitting, image processor), the tower's normalisation, the feature layer and the precision they are
computed in. `tower_key` hashes all of them and names the cache's folder, so changing any of them reads and writes
another folder: nothing stale is ever read. Within a folder an image is keyed by a hash of its content (a file's
bytes, an in-memory image's pixels): an edited image is computed again, a renamed or re-listed one is not.

Layout of `<train.feature_cache_dir, or OUT/feature_cache>/<tower key>/`:
    recipe.json           what the key stands for (to read, not used)
    shard-<id>.npy        fp16 features [rows, N, Dv], read with np.load(mmap_mode="r")
    shard-<id>.json       the image hashes of its first rows, in order (rows past them are unused)
A fill writes new shards and never touches old ones, each .json written last and atomically, so a reader or a
second writer never sees half a shard. Under DDP each process computes its share of the missing images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlmlab.config import Config, ConfigError, DataConfig
from vlmlab.data.batching import ExampleDataset, collate
from vlmlab.data.example import Example
from vlmlab.distributed import Processes
from vlmlab.faults import write_text_atomically
from vlmlab.images import ImageError, ImagePrep, _load_processor, load_image
from vlmlab.log import info, warn
from vlmlab.prompts import format_prompt
from vlmlab.vision import VisionTower

FORMAT = 1  # raised whenever the layout or what the key covers changes, which retires every older folder
KEY_LENGTH = 24  # hex digits of the key in the folder's name


def cache_root(cfg: Config, out_dir: Path) -> Path:
    """`train.feature_cache_dir`, or OUT/feature_cache: where derived artefacts that many runs can share live."""
    return Path(cfg.train.feature_cache_dir).expanduser() if cfg.train.feature_cache_dir else out_dir / "feature_cache"


def cache_wanted(cfg: Config) -> bool:
    """Whether this run trains from cached features (`train.feature_cache`: auto | on | off)."""
    mode = cfg.train.feature_cache
    reusable = cfg.vision.train == "frozen" and cfg.data.random_resize >= 1.0
    if mode == "on" and not reusable:
        raise ConfigError(f"train.feature_cache=on needs vision.train=frozen and data.random_resize=1 (got "
                          f"{cfg.vision.train} and {cfg.data.random_resize}): features that change cannot be reused")
    return mode == "on" or (mode == "auto" and reusable)


def _update(digest, tensor: torch.Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tower_key(vision: VisionTower, prep: ImagePrep, precision: torch.dtype | None) -> tuple[str, dict]:
    """(hex key, the recipe it hashes): tower config and weights, preprocessing, normalisation, layer, precision."""
    recipe = {
        "format": FORMAT,
        "tower": vision.model.config.to_dict(),
        "feature_layer": vision.feature_layer,
        "image_size": vision.image_size,
        "mean": vision.mean.flatten().tolist(),
        "std": vision.std.flatten().tolist(),
        "preprocessing": dataclasses.asdict(prep),
        "processor": _load_processor(prep.processor).to_dict() if prep.processor else None,
        "precision": str(precision) if precision else "fp32",
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision.model.state_dict().items()):
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest(), recipe


def image_hash(image) -> str:
    """sha256 of an image's content: a file's bytes; an in-memory or lazily opened image's mode, size and pixels.
    Raises ImageError for a file that is not there or an image that cannot be opened."""
    digest = hashlib.sha256()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        digest.update(path.read_bytes())
        return digest.hexdigest()
    picture = image if isinstance(image, Image.Image) else load_image(image)
    digest.update(f"{picture.mode}{picture.size}".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


def image_key(example: Example) -> str:
    """Examples of one image share it (as in batching.py)."""
    return example.image_id or str(id(example.image))


class FeatureStore:
    """The features of one tower key: image hash -> fp16 `[N, Dv]`, read memory-mapped from the shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: dict[str, tuple[str, int]] = {}  # image hash -> (shard name, row)
        self._arrays: dict[str, np.ndarray] = {}  # opened per process, on first use
        self.refresh()

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps instead of receiving copies
        return {**self.__dict__, "_arrays": {}}

    def refresh(self) -> None:
        """Takes in the shards written since (by this process or others)."""
        for listing in sorted(self.folder.glob("shard-*.json")):
            for row, digest in enumerate(json.loads(listing.read_text())):
                self.rows.setdefault(digest, (listing.stem, row))

    def __contains__(self, digest: str) -> bool:
        return digest in self.rows

    def features(self, digest: str) -> torch.Tensor:
        shard, row = self.rows[digest]
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.folder / f"{shard}.npy", mmap_mode="r")
        return torch.from_numpy(np.array(self._arrays[shard][row]))  # copied out of the map: [N, Dv] fp16


@torch.no_grad()
def fill(store: FeatureStore, vision: VisionTower, prep: ImagePrep, images: dict[str, object], batch_size: int,
         precision: torch.dtype | None, processes: Processes) -> int:
    """Computes the features of the images (hash -> image) that `store` lacks, this process's share of them, into
    one new shard; returns how many were missing over all processes."""
    missing = sorted(digest for digest in images if digest not in store)
    processes.barrier()  # every process lists the same missing images before any of them writes a shard
    mine = missing[processes.rank :: processes.world]
    device = vision.mean.device
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    name = f"shard-{uuid.uuid4().hex}"
    partial = store.folder / f"{name}.partial.npy"
    array, listing = None, []
    was_training = vision.training
    vision.eval()
    bar = tqdm(total=len(mine), desc="feature cache", unit="image", disable=None if processes.is_main else True)
    for start in range(0, len(mine), batch_size):
        pixels = []
        for digest in mine[start : start + batch_size]:
            try:
                pixels.append(prep(load_image(images[digest])))
                listing.append(digest)
            except ImageError as err:
                warn(f"image skipped: {err}")
        if pixels:
            with autocast:
                features = vision(torch.stack(pixels).to(device)).float().cpu().numpy().astype(np.float16)
            if not np.isfinite(features).all():
                raise ValueError("vision features beyond fp16's range cannot be cached; set train.feature_cache=off")
            if array is None:  # [rows, N, Dv]; the last rows stay unused when some images fail to load
                array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16,
                                                  shape=(len(mine), *features.shape[1:]))
            array[len(listing) - len(pixels) : len(listing)] = features
        bar.update(len(mine[start : start + batch_size]))
    bar.close()
    vision.train(was_training)
    if array is not None:
        array.flush()
        del array
        os.replace(partial, store.folder / f"{name}.npy")
        write_text_atomically(store.folder / f"{name}.json", json.dumps(listing))
    processes.barrier()  # every process's shard is written before anyone reads
    store.refresh()
    return len(missing)


class FeatureDataset(Dataset):
    """Training items as `ExampleDataset`'s, with the image's cached features `[N, Dv]` (fp16) in place of its
    pixels; an example whose image could not be read gives None. `failed` holds those images' keys."""

    def __init__(self, examples: list[Example], data: DataConfig, store: FeatureStore, hashes: dict[str, str | None]):
        self.examples = examples
        self.data = data
        self.store = store
        self.hashes = hashes  # image key -> content hash (None: unreadable) of every image the run will visit
        self.failed = {key for key, digest in hashes.items() if digest is None or digest not in store}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | tuple[int, int]):
        example = self.examples[index[0] if isinstance(index, tuple) else index]  # (index, seed): nothing to draw
        digest = self.hashes[image_key(example)]
        if digest is None or digest not in self.store:
            return None
        return self.store.features(digest), format_prompt(self.data, example.question), example.target, example


def collate_features(items: list) -> dict | None:
    """`collate`, with the batch's per-image tensor named `features` `[U, N, Dv]` instead of `pixels`."""
    batch = collate(items)
    if batch is not None:
        batch["features"] = batch.pop("pixels")
    return batch


def _visited(examples: list[Example], batches: Iterable[list[int]]) -> list[Example]:
    """The examples the run will draw (stops once every one has been drawn)."""
    seen: set[int] = set()
    for batch in batches:
        seen.update(batch)
        if len(seen) == len(examples):
            break
    return [examples[index] for index in sorted(seen)]


def _hash_images(examples: list[Example], hashes: dict[str, str | None], processes: Processes) -> dict[str, object]:
    """Adds each new image's content hash to `hashes` (None when unreadable); returns hash -> image for them."""
    images = {}
    new = {image_key(e): e.image for e in examples if image_key(e) not in hashes}
    quiet = None if processes.is_main else True
    for key, image in tqdm(new.items(), desc="hashing images", unit="image", disable=quiet):
        try:
            hashes[key] = image_hash(image)
            images[hashes[key]] = image
        except ImageError as err:
            hashes[key] = None
            warn(f"image skipped: {err}")
    return images


def training_data(model, examples: list[Example], cfg: Config, out_dir: Path, batches: Iterable[list[int]],
                  precision: torch.dtype | None, processes: Processes) -> tuple[Dataset, Callable]:
    """The training dataset and its collate function: cached features where `cache_wanted`, else pixels.

    `batches` are the example indices the run will draw: a run shorter than an epoch computes only their images.
    """
    if not cache_wanted(cfg):
        return ExampleDataset(examples, cfg.data, model.vision.image_size, augment=True), collate
    prep = ImagePrep.from_config(cfg.data, model.vision.image_size)
    key, recipe = tower_key(model.vision, prep, precision)
    root = cache_root(cfg, out_dir)
    folder = root / key[:KEY_LENGTH]
    folder.mkdir(parents=True, exist_ok=True)
    if processes.is_main and not (folder / "recipe.json").is_file():
        write_text_atomically(folder / "recipe.json", json.dumps(recipe, indent=1, default=str))
    store, hashes = FeatureStore(folder), {}
    batch_size = cfg.train.batch_size // cfg.train.grad_accum  # the tower sees batches no larger than in training
    wanted = _visited(examples, batches)
    images = _hash_images(wanted, hashes, processes)
    computed = fill(store, model.vision, prep, images, batch_size, precision, processes)
    if len(wanted) < len(examples) and any(d is None or d not in store for d in hashes.values()):
        # A micro-batch of unreadable images is skipped and another one drawn, past the planned ones: cover all.
        images = _hash_images(examples, hashes, processes)
        computed += fill(store, model.vision, prep, images, batch_size, precision, processes)
    if processes.is_main:
        info(f"feature cache: {computed} of {len(hashes)} images computed, the others reused; in {folder}")
    return FeatureDataset(examples, cfg.data, store, hashes), collate_features
