"""`VLM(vision, connector, language)`: composes the three parts; builds, saves and loads them.

A saved model directory holds `config.yaml` (resolved), `vision/` and `language/` (`save_pretrained`, safetensors,
tokenizer included) and `connector.safetensors` (+ `connector/`, the config and tokenizer of a transformers Q-Former,
blip2.py); `VLM.load` rebuilds each part from there by local path, the
same code that loads hub names. A part whose base weights are those of its named checkpoint (frozen, LoRA, DoRA)
is saved by reference instead: its folder holds only the adapter (tuning.py), and loading takes the base from
the name in `config.yaml` again.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vlmlab.blip2 import as_is_config, half_precision, is_checkpoint
from vlmlab.config import Config, ConfigError, load_config, read_from_folder, save_config
from vlmlab.connectors import build_connector
from vlmlab.images import ImagePrep, load_image, num_views
from vlmlab.language import LanguageModel, build_language
from vlmlab.loading import load_exact, refuse_incomplete
from vlmlab.log import warn
from vlmlab.prompts import format_prompt
from vlmlab.tokenizer import train_tokenizer
from vlmlab.tuning import (apply_tuning, check_modes, is_adapted, load_reference, merge_adapter, save_reference,
                           saved_by_reference)
from vlmlab.vision import VisionTower, build_vision
from vlmlab.weights import check_reference, record

CONFIG_FILE = "config.yaml"
CONNECTOR_FILE = "connector.safetensors"
CONNECTOR_DIR = "connector"  # a transformers Q-Former's config and tokenizer (blip2.py)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use auto or cpu")
    return device


class VLM(nn.Module):
    def __init__(self, vision: VisionTower, connector: nn.Module, language: LanguageModel, config: Config):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.language = language
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- core --------------------------------------------------------------------------------------------------
    def visual_tokens(self, pixels: torch.Tensor | None, features: torch.Tensor | None = None,
                      image_index: torch.Tensor | None = None, prompts: list[str] | None = None,
                      views: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 pixels `[U, 3, S, S]` -> visual tokens `[U, M, Dl]`; or the tower's `features` `[U, N, Dv]`
        computed before (a frozen tower's, from the feature cache), which skips the tower. `image_index` `[B]`
        picks each example's image: `[B, M, Dl]`. A connector that reads the prompt too (InstructBLIP's Q-Former)
        runs once per example, on `prompts`, after the pick; any other once per image, before it. `views` bool
        `[U, 5]` (image splitting, `images.views_read`): the views of each image the connector reads."""
        if features is None:
            features = self.vision(pixels.to(self.device, non_blocking=True))
        # cached features are stored in fp16, a half-precision tower (vision.dtype) gives its own: the connector
        # computes in its dtype (autocast lowers it where asked)
        features = features.to(self.device, next(self.connector.parameters()).dtype, non_blocking=True)
        if getattr(self.connector, "reads_prompt", False):
            if image_index is not None:
                features = features[image_index.to(features.device)]  # [B, N, Dv]
            return self.connector(features, prompts)
        visual = self.connector(features) if views is None else self.connector(features, views)
        return visual if image_index is None else visual[image_index.to(visual.device)]

    def forward(self, pixels: torch.Tensor | None, prompts: list[str], targets: list[str],
                image_index: torch.Tensor | None = None, features: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss of a batch: mean cross-entropy over the answer tokens.

        `pixels` `[U, 3, S, S]` (or cached `features` `[U, N, Dv]`, pixels None) holds each distinct image once;
        `image_index` `[B]` picks each example's image (None: one image per example); `views` as in `visual_tokens`.
        """
        visual = self.visual_tokens(pixels, features, image_index, prompts, views)  # [B, M, Dl]
        lm = self.language
        return lm.loss(visual, lm.encode_prompts(prompts), lm.encode_targets(targets))

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: list[str], max_new_tokens: int,
                 image_index: torch.Tensor | None = None, views: torch.Tensor | None = None, **options) -> list[str]:
        """Text for each prompt; `pixels`, `image_index` and `views` as in `forward`. `options` go to
        `LanguageModel.generate` (min_new_tokens, num_beams, streamer=a transformers streamer for one prompt)."""
        visual = self.visual_tokens(pixels, None, image_index, prompts, views)
        lm = self.language
        return lm.generate(visual, lm.encode_prompts(prompts), max_new_tokens, **options)

    # -- one image at a time -----------------------------------------------------------------------------------
    def pixels_of(self, images: Iterable[Image.Image | str | Path]) -> torch.Tensor:
        prep = ImagePrep.from_config(self.config.data, self.vision.image_size)
        return torch.stack([prep(load_image(image)) for image in images])

    def ask(self, image: Image.Image | str | Path, question: str) -> str:
        if not question or not question.strip():
            raise ValueError("the question is empty; ask something about the image")
        fitted = self.language.fit_question(question, lambda text: format_prompt(self.config.data, text))
        if fitted != question:
            warn(f"question cut to its first {len(fitted)} of {len(question)} characters to fit "
                 f"language.max_prompt_tokens={self.language.max_prompt_tokens}")
        prompt = format_prompt(self.config.data, fitted)
        return self.generate(self.pixels_of([image]), [prompt], **self._generation_options(caption=False))[0]

    def caption(self, image: Image.Image | str | Path) -> str:
        prompt = format_prompt(self.config.data, None)
        return self.generate(self.pixels_of([image]), [prompt], **self._generation_options(caption=True))[0]

    def _generation_options(self, caption: bool) -> dict:
        ev = self.config.eval
        return {
            "max_new_tokens": ev.caption_max_new_tokens if caption else ev.max_new_tokens,
            "min_new_tokens": ev.min_new_tokens,
            "num_beams": ev.num_beams,
        }

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(self.config, directory / CONFIG_FILE)
        for name in ("vision", "language"):
            if saved_by_reference(getattr(self.config, name)):
                save_reference(getattr(self, name), directory / name)
            else:
                getattr(self, name).save(directory / name)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.connector.state_dict().items()}
        save_file(state, directory / CONNECTOR_FILE)
        if hasattr(self.connector, "save_config"):  # a transformers Q-Former: its config (+ tokenizer) beside
            self.connector.save_config(directory / CONNECTOR_DIR)

    def merge_adapters(self) -> list[str]:
        """Folds each part's LoRA/DoRA adapter into its base weights, in place; returns the parts merged.

        A merged part is a plain transformers model again (no adapter arithmetic at inference) and is saved in
        full, so its config says `train: full`.
        """
        merged = []
        for name in ("vision", "language"):
            if is_adapted(getattr(self, name).model):
                merge_adapter(getattr(self, name))
                getattr(self, name).model.float()  # a part that may train in full again keeps fp32 weights
                getattr(self.config, name).train, getattr(self.config, name).dtype = "full", "fp32"
                merged.append(name)
        return merged

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", revision: str = "") -> VLM:
        """Loads a saved model: a `model/` directory, a run directory that holds one, or a hub id (`user/repo`,
        at `revision`) of a model `vlmlab export --push-to-hub` uploaded; offline (HF_HUB_OFFLINE=1) the hub cache.
        A BLIP-2 / InstructBLIP transformers checkpoint (path or hub id) loads as it is, every part frozen
        (`blip2.as_is_config`)."""
        if is_checkpoint(str(directory), revision):
            config = as_is_config(str(directory), revision, half_precision(resolve_device(device)))
            model = build_vlm(config)
            record(config)  # which weights these are, for metrics.json
            return model.to(resolve_device(device)).eval()
        directory = _hub_snapshot(directory, revision)
        if (directory / "model" / CONFIG_FILE).is_file():  # a run directory (it has a config.yaml of its own)
            directory = directory / "model"
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no saved vlmlab model here (no {CONFIG_FILE})")
        config = load_config(directory / CONFIG_FILE)
        parts = copy.deepcopy(config)
        for part in ("vision", "language"):
            if not saved_by_reference(getattr(config, part)):
                read_from_folder(getattr(parts, part), str(directory / part))
        if (directory / CONNECTOR_DIR).is_dir():  # a transformers Q-Former: built from its saved config
            parts.connector.init = str(directory / CONNECTOR_DIR)
        model = build_vlm(parts)
        model.config = config
        # A saved model must be complete: weights missing from a part, or a connector built by config.yaml that
        # its saved weights do not fit, is refused rather than filled with random values.
        for part in ("vision", "language"):
            if saved_by_reference(getattr(config, part)):  # a base by name: only its adapter is ours to check
                load_reference(getattr(model, part), directory / part)
                section = getattr(config, part)  # a warning when its name now resolves to other weights:
                section.resolved = check_reference(section, part, directory)
            else:
                refuse_incomplete(getattr(model, part).model, directory / part)
        connector_config = ", ".join(f"connector.{k}={v!r}" for k, v in vars(config.connector).items())
        load_exact(model.connector, directory / CONNECTOR_FILE, f"{CONFIG_FILE} ({connector_config})")
        return model.to(resolve_device(device)).eval()


def _hub_snapshot(name: str | Path, revision: str) -> Path:
    """A local path as it is; a name that is no local path but looks like a hub id: its snapshot folder."""
    path = Path(name)
    if path.exists() or not isinstance(name, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision or None))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(f"{name}: no such folder, and not in the hub cache (offline, or the hub is not "
                                f"reachable)") from err
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{name}: no such folder, and not loadable from the hub ({type(err).__name__}: "
                                f"{first})") from err


def build_vlm(config: Config, texts: Iterable[str] | None = None) -> VLM:
    """Builds the three parts; a tiny LM gets a tokenizer trained on `texts` (the training prompts and targets)."""
    check_modes(config)
    tokenizer = None
    if not config.language.model:
        if texts is None:
            raise ValueError("building a tiny language model needs the training text for its tokenizer")
        tokenizer = train_tokenizer(texts, config.language.vocab_size)
    vision = build_vision(config.vision)
    language = build_language(config.language, tokenizer)
    return assemble_vlm(vision, language, config)


def assemble_vlm(vision: VisionTower, language: LanguageModel, config: Config,
                 connector: nn.Module | None = None) -> VLM:
    """Adds the connector that fits `vision` to `language` (or `connector`, built already), and sets how each part
    trains (tuning.py)."""
    if connector is None:
        num_features, vision_dim, grid = vision.feature_layout()
        num_features *= num_views(config.data)  # image splitting: the views' features are concatenated along N
        positioned = grid is not None  # a convnet's features say nothing of where they were
        connector = build_connector(config.connector, vision_dim, language.hidden_size, num_features, positioned,
                                    grid)
    model = VLM(vision, connector, language, config)
    for part in ("vision", "language"):
        apply_tuning(getattr(model, part), getattr(config, part), part)
    if language.fusion is not None:  # new gated cross-attention blocks train whatever the LM's mode (fusion.py)
        language.fusion.requires_grad_(True)
    return model


def start_from(directory: str | Path, config: Config) -> VLM:
    """A saved model to train further under `config` (`train.init_from`), e.g. a caption model adapted to VQA.

    The architecture is the saved model's: its vision, connector and language sections, and data.image_split
    (which sizes the connector), replace `config`'s; whether each part trains in full or stays frozen is `config`'s
    choice. A part saved in full is named by its saved folder, so this run's config says where its weights began;
    a LoRA/DoRA adapter is merged into its part first, and that part, named by no folder, is saved in full.
    """
    model = VLM.load(directory, device="cpu")
    adapted = model.merge_adapters()
    saved_at = Path(directory) / "model" if (Path(directory) / "model" / CONFIG_FILE).is_file() else Path(directory)
    merged = copy.deepcopy(config)
    merged.connector = copy.deepcopy(model.config.connector)
    for part in ("vision", "language"):
        section, mode = copy.deepcopy(getattr(model.config, part)), getattr(config, part).train
        if mode not in ("full", "frozen"):
            raise ConfigError(f"{part}.train={mode!r} with train.init_from is not supported; valid: full, frozen")
        if part in adapted:
            read_from_folder(section, "")  # its weights (base + adapter) exist in no folder: never saved by reference
        elif (saved_at / part / "config.json").is_file():
            read_from_folder(section, str(saved_at.resolve() / part))
        section.train = mode
        getattr(model, part).requires_grad_(mode == "full")
        setattr(merged, part, section)
    if model.language.fusion is not None:  # gated cross-attention blocks train whatever the LM's mode, as built
        model.language.fusion.requires_grad_(True)
    merged.data.image_split = model.config.data.image_split
    model.config = merged
    return model.train()


def describe_parts(model: VLM) -> list[str]:
    """One line per part: what it is, how it is trained, and its parameter counts."""
    rows = []
    for name, part, mode, kind in (
        ("vision", model.vision, model.config.vision.train, model.vision.model.config.model_type),
        ("connector", model.connector, "full", model.config.connector.kind),
        ("language", model.language, model.config.language.train, model.language.model.config.model_type),
    ):
        total = sum(p.numel() for p in part.parameters())
        trainable = sum(p.numel() for p in part.parameters() if p.requires_grad)
        rows.append(f"{name:<9} {kind:<20} {mode:<7} {total / 1e6:8.2f}M params, {trainable / 1e6:8.2f}M trainable")
    return rows
