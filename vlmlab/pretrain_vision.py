"""`vlmlab pretrain-vision`: a tiny vision tower that already knows world v2's objects, as CLIP knows photos.

The real recipe starts from a tower pretrained on hundreds of millions of pictures; the offline default starts
from random weights, and on world v2 the VLM's loss does not teach it shape (docs/world.md: the shape questions
stay at chance while the same tower trained directly on the scenes gets 0.99). So, offline, the tower can first
learn the world's pictures alone: for each scene of a seed no split draws (`data.seed + 1000`), which of the 32
(colour, shape) pairs it holds, from its features max-pooled over the map and one linear layer (dropped after),
so each cell learns to say what stands on it, colour and shape bound together. It is saved with `save_pretrained`
and its preprocessing, and a run loads it by path like any pretrained tower (`vision.model=DIR`, trained in full,
frozen, or with LoRA).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmlab.config import Config, ConfigError
from vlmlab.data import world
from vlmlab.data.scene import COLORS, SHAPES
from vlmlab.images import ImagePrep
from vlmlab.pretrain import WORLD_SEED_OFFSET
from vlmlab.vision import build_vision

BATCH, LR = 64, 1e-3
HELD_OUT = 300  # scenes of the same seed kept apart to measure it
PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]  # the 32 labels


def _scenes(cfg: Config, count: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` scenes' pixels `[n, 3, S, S]` (uint8) and which of PAIRS each holds `[n, 32]` (0 / 1)."""
    examples = world.make_split(split, count, cfg.data.world, seed=cfg.data.seed + WORLD_SEED_OFFSET,
                                questions_per_image=0, captions=True)
    prep = ImagePrep.from_config(cfg.data, cfg.vision.image_size)
    pixels = torch.stack([prep(example.image) for example in examples])
    held = [{(o["color"], o["shape"]) for o in example.extra["scene"]["objects"]} for example in examples]
    return pixels, torch.tensor([[float(pair in scene) for pair in PAIRS] for scene in held])


def _predict(tower, head: nn.Linear, pixels: torch.Tensor) -> torch.Tensor:
    return head(tower(pixels).max(dim=1).values)  # features [B, N, Dv] -> max over the map [B, Dv] -> [B, 32]


def _ranked_right(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Per scene, the share of (held pair, absent pair) couples whose scores rank the held one higher, averaged over
    scenes (a per-scene AUC: 0.5 by chance, whatever the threshold)."""
    above = scores.unsqueeze(2) > scores.unsqueeze(1)  # [n, 32, 32]: pair i scored above pair j
    couples = labels.unsqueeze(2) * (1 - labels).unsqueeze(1)  # [n, 32, 32]: i held, j absent
    return ((above * couples).sum(dim=(1, 2)) / couples.sum(dim=(1, 2)).clamp(min=1)).mean().item()


def pretrain_vision(cfg: Config, out: Path, steps: int, scenes: int) -> dict:
    """Trains the tiny tower of `cfg.vision` `steps` steps on `scenes` world v2 scenes, saves it to `out` with its
    recipe; returns the recipe, which records the held-out scenes' label accuracy and exact-set accuracy."""
    if cfg.vision.model:
        raise ConfigError(f"vision.model={cfg.vision.model!r} is not allowed here: pretrain-vision builds a tiny "
                          "tower from scratch (vision.family, hidden_size, num_layers, image_size)")
    if steps < 1 or scenes < 1:
        raise ValueError(f"--steps and --scenes must be 1 or more, got {steps} and {scenes}")
    if cfg.data.world.generator == "v1":
        raise ConfigError("data.world.generator='v1' is not allowed here: pretrain-vision learns world v2's "
                          "scenes (scatter or tiles)")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        tower = build_vision(cfg.vision)  # a ResNet's map cells or a ViT's patch tokens: both pool the same way
        pixels, labels = _scenes(cfg, scenes, "train")
        test_pixels, test_labels = _scenes(cfg, HELD_OUT, "test")
        head = nn.Linear(tower.feature_layout()[1], len(PAIRS))
        optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=LR)
        order = random.Random(cfg.train.seed)
        tower.train()
        for _ in tqdm(range(steps), desc="pretrain-vision on the world's scenes", leave=False, disable=None):
            rows = torch.tensor(order.sample(range(len(pixels)), min(BATCH, len(pixels))))
            loss = nn.functional.binary_cross_entropy_with_logits(_predict(tower, head, pixels[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        tower.eval()
        with torch.no_grad():
            scores = _predict(tower, head, test_pixels)  # [n, 32] logits
    right = (scores > 0).float() == test_labels
    recipe = {"vision": {name: getattr(cfg.vision, name) for name in ("family", "hidden_size", "num_layers",
                                                                       "image_size", "patch_size", "num_heads")},
              "image_resize": cfg.data.image_resize, "steps": steps, "batch_size": BATCH, "lr": LR,
              "torch_seed": cfg.train.seed,
              "scenes": {"generator": cfg.data.world.generator, "world_seed": cfg.data.seed + WORLD_SEED_OFFSET,
                         "train": len(pixels), "held_out": len(test_pixels)},
              "last_loss": round(loss.item(), 4),
              "label_accuracy": round(right.float().mean().item(), 4),
              "label_base_rate": round(max(test_labels.mean().item(), 1 - test_labels.mean().item()), 4),
              "exact_set_accuracy": round(right.all(dim=1).float().mean().item(), 4),
              "label_auc": round(_ranked_right(scores, test_labels), 4)}
    out.mkdir(parents=True, exist_ok=True)
    tower.save(out)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe
