"""Captioning datasets in their official formats, and the one record builder their hub versions share.

- COCO captions, Karpathy split: `dataset_coco.json` (`{"images": [{filepath, filename, split, cocoid,
  sentences: [{raw, ...}]}]}`), images at `<folder>/<filepath>/<filename>`; train is Karpathy's train + restval.
  Any Karpathy-format file (Flickr8k / Flickr30k too) loads when given as the path itself.
- Flickr8k: `Flickr8k.token.txt` (`<image>#<n>\\t<caption>` per line) with `Flickr_8k.{train,dev,test}Images.txt`,
  the images in `Flicker8k_Dataset/` (the official archive's spelling) or `Flickr8k_Dataset/`.

Training gets one example per caption (that caption the target, all of the image's captions its references);
evaluation gets one example per image with every caption as a reference, as the COCO caption evaluation scores.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmlab.data.example import Example
from vlmlab.data.records import Collector, MissingFiles, read_json

KARPATHY_FILE = "dataset_coco.json"
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLITS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
FLICKR8K_IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
_NUMBERED_CAPTION = re.compile(r"captions?_?(\d+)")


def caption_examples(captions: list, image, image_id: str, split: str) -> list[Example]:
    """The examples of one image: one per caption when training, else one with all captions as references."""
    captions = [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]
    if not captions:
        raise ValueError("no caption")
    if split != "train":
        return [Example(image, None, captions, "caption", image_id, image_id)]
    return [
        Example(image, None, captions[i:] + captions[:i], "caption", image_id, f"{image_id}#{i}")
        for i in range(len(captions))
    ]


def captions_of(row: dict) -> list:
    """The captions of a hub row, whichever way it spells them: `sentences` (strings or Karpathy's
    `{"raw": ...}`), `captions` / `caption` (a list or one string), or numbered `caption_0`, `caption_1`, ..."""
    for key in ("sentences", "captions", "caption"):
        value = row.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [item["raw"] if isinstance(item, dict) else item for item in value]
    numbered = sorted((int(m.group(1)), key) for key in row if (m := _NUMBERED_CAPTION.fullmatch(key)))
    return [row[key] for _, key in numbered]


def read_karpathy(path: Path, split: str) -> list[Example]:
    """A Karpathy-split JSON file, or a folder holding `dataset_coco.json`."""
    file = path / KARPATHY_FILE if path.is_dir() else path
    if not file.is_file():
        raise MissingFiles(f"{path}: needs {KARPATHY_FILE} (Karpathy's split file)")
    data = read_json(file)
    wanted = KARPATHY_SPLITS[split]
    dataset = str(data.get("dataset", "karpathy"))
    collector = Collector(f"{file.name}")
    for number, entry in enumerate(data.get("images", [])):
        if entry.get("split") not in wanted:
            continue

        def build(entry=entry):
            image = file.parent / entry.get("filepath", "") / entry["filename"]
            image_id = f"coco-{entry['cocoid']}" if "cocoid" in entry else f"{dataset}-{entry['filename']}"
            return caption_examples(captions_of(entry), str(image), image_id, split)

        collector.add(f"image {entry.get('filename', number)}", build)
    return collector.result()


def read_flickr8k(root: Path, split: str) -> list[Example]:
    """Flickr8k from `root`: the official token file, the split's image list and the image folder."""
    tokens, listing = root / FLICKR8K_TOKENS, root / FLICKR8K_SPLITS[split]
    if not tokens.is_file() or not listing.is_file():
        raise MissingFiles(f"{root}: needs {FLICKR8K_TOKENS} and {listing.name} (the official text files)")
    folder = next((root / name for name in FLICKR8K_IMAGE_FOLDERS if (root / name).is_dir()), None)
    if folder is None:
        raise MissingFiles(f"{root}: needs the image folder {FLICKR8K_IMAGE_FOLDERS[0]}/")
    captions: dict[str, list[str]] = {}
    collector = Collector(f"flickr8k {FLICKR8K_TOKENS}")
    for number, line in enumerate(tokens.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab or "#" not in name:
            collector.skip(f"line {number}", "not <image>#<n><tab><caption>")
            continue
        captions.setdefault(name.rsplit("#", 1)[0], []).append(caption)
    for name in listing.read_text(encoding="utf-8").split():
        collector.add(name, lambda name=name: caption_examples(
            captions.get(name, []), str(folder / name), f"flickr8k-{name}", split))
    return collector.result()


def caption_rows(rows, images, split: str, dataset: str) -> list[Example]:
    """Examples from hub rows (captions in any of the spellings `captions_of` knows) and their lazy images."""
    collector = Collector(f"{dataset} (hub, {split})")
    for index, (row, image) in enumerate(zip(rows, images)):
        key = row.get("cocoid", row.get("image_id", row.get("filename")))
        image_id = f"{dataset}-{key}" if key is not None else f"{dataset}-{split}-{index}"
        collector.add(f"row {index}", lambda row=row, image=image, image_id=image_id: caption_examples(
            captions_of(row), image, image_id, split))
    return collector.result()
