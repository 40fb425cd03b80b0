"""The vision part: a `transformers` vision tower that turns images into features `[B, N, Dv]`.

Any tower loads by hub name or local path; CLIP and SigLIP checkpoints (which also carry a text tower) load only
their vision half. With no name, a tiny tower of the same class is built from scratch for offline work.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    Blip2VisionModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    InstructBlipVisionModel,
    ResNetConfig,
    ResNetModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_processing_utils import ImageProcessingMixin

from vlmlab.blip2 import family_of, load_part
from vlmlab.config import VisionConfig
from vlmlab.loading import WEIGHT_DTYPES, pretrained_config, pretrained_model
from vlmlab.registry import lookup

def _tiny_vit(config_class, model_class):
    def build(cfg: VisionConfig) -> nn.Module:
        return model_class(
            config_class(
                hidden_size=cfg.hidden_size,
                intermediate_size=4 * cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
            )
        )

    return build


def _tiny_resnet(cfg: VisionConfig) -> nn.Module:
    # Stem (stride 4), then `num_layers` stages of basic blocks, each after the first halving the map and
    # doubling the width up to hidden_size: 64 px, 2 stages -> an 8 x 8 map, 64 features.
    widths = [max(cfg.hidden_size >> (cfg.num_layers - 1 - i), 8) for i in range(cfg.num_layers)]
    config = ResNetConfig(embedding_size=widths[0], hidden_sizes=widths, depths=[1] * cfg.num_layers,
                          layer_type="basic", image_size=cfg.image_size)
    return ResNetModel(config)


# Tiny towers built from scratch with the same transformers classes as the pretrained ones.
TINY_FAMILIES = {
    "clip": _tiny_vit(CLIPVisionConfig, CLIPVisionModel),
    "siglip": _tiny_vit(SiglipVisionConfig, SiglipVisionModel),
    "resnet": _tiny_resnet,
}
# Checkpoints whose model_type names a dual-encoder: load only the vision half of it.
VISION_HALF_OF = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    # a BLIP-2 / InstructBLIP tower saved alone (a whole checkpoint's is loaded by blip2.load_part)
    "blip_2_vision_model": Blip2VisionModel,
    "instructblip_vision_model": InstructBlipVisionModel,
}
PREPROCESSOR_FILE = "preprocessor_config.json"


def layers_computed(num_layers: int, feature_layer: int) -> int:
    """How many of a ViT's `num_layers` blocks hidden state `feature_layer` needs (state 0 is the embeddings'
    output, state i block i's): the blocks after it need not run. -2 of CLIP ViT-L/14's 24 needs 23."""
    index = feature_layer if feature_layer < 0 else feature_layer - (num_layers + 1)
    return num_layers + 1 + index


def _block_list(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """(encoder, its blocks) of a CLIP- or SigLIP-style ViT; None for a tower laid out otherwise."""
    encoder = getattr(getattr(model, "vision_model", model), "encoder", None)
    blocks = getattr(encoder, "layers", None)
    return (encoder, blocks) if isinstance(blocks, nn.ModuleList) else None


class VisionTower(nn.Module):
    """uint8 pixels `[B, 3, S, S]` -> features `[B, N, Dv]` taken from hidden state `feature_layer`.

    A convolutional tower's map `[B, C, H, W]` is read as H * W features of width C (row by row).

    A ViT whose `feature_layer` comes before its last block runs only the blocks up to it (BLIP-2 drops its ViT's
    last layer likewise): the later blocks are set aside, off the module tree, so they take no time, no device
    memory, no gradient, no optimizer state, no parking and no part in the feature cache's key; `save` writes
    them back with the rest, so a saved tower is the whole checkpoint its config.json describes.
    """

    def __init__(self, model: nn.Module, feature_layer: int, image_size: int, mean, std):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._hidden_index = None if feature_layer == -1 else feature_layer  # None: the model's last_hidden_state
        self._set_aside = None  # (encoder, all its blocks, the blocks that run) when later blocks are set aside
        found = _block_list(model)
        if found is not None:
            encoder, blocks = found
            kept = layers_computed(len(blocks), feature_layer)
            if 1 <= kept < len(blocks):
                running = nn.ModuleList(blocks[:kept])
                encoder.layers = running
                self._set_aside = (encoder, blocks, running)  # a tuple: not registered as submodules
                self._hidden_index = kept  # the last block that runs (its raw output, before any final norm);
                # counted from the front: transformers resolves negative indices against config.num_hidden_layers

    @torch.no_grad()
    def feature_layout(self) -> tuple[int, int, tuple[int, int] | None]:
        """(N, Dv, grid) of this tower's features, read off one blank image (towers name their widths differently).

        grid: (H, W) of a convolutional tower's map, whose H * W features carry no position of their own (the
        connector adds one); None for a ViT, whose tokens carry theirs.
        """
        blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8, device=self.mean.device)
        state = self._hidden_state(blank)
        if state.ndim == 4:  # [1, C, H, W]
            _, width, rows, columns = state.shape
            return rows * columns, width, (rows, columns)
        _, length, width = state.shape
        return length, width, None

    def _hidden_state(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's hidden state `feature_layer`: `[B, N, Dv]` for a ViT, `[B, C, H, W]` for a convnet."""
        dtype = next(self.model.parameters()).dtype
        pixel_values = ((pixels.float() / 255.0 - self.mean) / self.std).to(dtype)
        if self._hidden_index is None:  # the common case needs no list of every layer's states
            return self.model(pixel_values=pixel_values).last_hidden_state
        # Asking for that one state keeps only it (transformers >= 5), not every layer's: less memory, same values.
        states = self.model(pixel_values=pixel_values, output_hidden_states=[self._hidden_index]).hidden_states
        return states[self._hidden_index]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim == 5:  # image splitting: views [B, V, 3, S, S], each encoded alone -> [B, V * N, Dv]
            batch, views = pixels.shape[:2]
            return self(pixels.flatten(0, 1)).unflatten(0, (batch, views)).flatten(1, 2)
        features = self._hidden_state(pixels)
        if features.ndim == 4:  # [B, C, H, W] -> [B, H * W, C]
            features = features.flatten(2).transpose(1, 2)
        return features

    @contextlib.contextmanager
    def whole(self):
        """The set-aside blocks back in the encoder for the duration (to save or count the whole checkpoint)."""
        if self._set_aside is None:
            yield
            return
        encoder, blocks, running = self._set_aside
        encoder.layers = blocks
        try:
            yield
        finally:
            encoder.layers = running

    def save(self, directory: Path) -> None:
        with self.whole():
            self.model.save_pretrained(directory)
        preprocessing = ImageProcessingMixin(
            image_mean=self.mean.flatten().tolist(),
            image_std=self.std.flatten().tolist(),
            size={"height": self.image_size, "width": self.image_size},
        )
        preprocessing.save_pretrained(directory)


def _pretrained_tower(name: str, trust_remote_code: bool, revision: str,
                      dtype: torch.dtype) -> tuple[nn.Module, list[float], list[float]]:
    config = pretrained_config("vision.model", name, trust_remote_code, revision)
    if family_of(config) is not None:  # a whole BLIP-2 / InstructBLIP checkpoint: its ViT
        model = load_part(config, "vision", "vision.model", name, trust_remote_code, revision, dtype)
    else:
        model_class = VISION_HALF_OF.get(config.model_type, AutoModel)
        model = pretrained_model(model_class, "vision.model", name, trust_remote_code, revision, dtype=dtype)
    try:
        processor = ImageProcessingMixin.get_image_processor_dict(name, revision=revision or None)[0]
    except OSError:  # a tower saved without preprocessing: the ImageNet statistics most towers were trained on
        processor = {}
    return model, processor.get("image_mean", [0.485, 0.456, 0.406]), processor.get("image_std", [0.229, 0.224, 0.225])


def build_vision(cfg: VisionConfig) -> VisionTower:
    if cfg.model:
        model, mean, std = _pretrained_tower(cfg.model, cfg.trust_remote_code, cfg.revision, WEIGHT_DTYPES[cfg.dtype])
        image_size = getattr(model.config, "image_size", None) or cfg.image_size
    else:
        model = lookup(TINY_FAMILIES, cfg.family, "tiny vision family")(cfg).to(WEIGHT_DTYPES[cfg.dtype])
        mean, std, image_size = [0.5] * 3, [0.5] * 3, cfg.image_size
    return VisionTower(model, cfg.feature_layer, image_size, mean, std)
