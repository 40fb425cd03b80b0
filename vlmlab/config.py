"""The one nested config: vision / connector / language / data / train / eval.

Presets are plain functions returning a `Config` (see presets.py). Users change it with `section.field=value`
overrides or a YAML file; both go through `set_field`, which checks the section, the field and the value's type,
and names what is allowed when something is wrong. The resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names what is."""


@dataclass
class VisionConfig:
    model: str = ""  # hub name or local path; "" builds a tiny tower of `family` from scratch
    family: str = "clip"  # tiny tower's transformers family: clip | siglip | resnet
    train: str = "full"  # full | frozen
    feature_layer: int = -1  # index into the tower's hidden states; -2 is the usual LLaVA choice
    image_size: int = 64  # tiny tower, or a pretrained tower whose config names no size (convnets)
    patch_size: int = 8  # tiny ViT only
    hidden_size: int = 128  # tiny tower: ViT width, or a ResNet's last stage width
    num_layers: int = 3  # tiny tower: ViT layers or ResNet stages
    num_heads: int = 4  # tiny ViT only


@dataclass
class ConnectorConfig:
    kind: str = "qformer"  # qformer | perceiver | mlp | linear
    num_queries: int = 16  # visual tokens handed to the LM (qformer, perceiver)
    hidden_size: int = 128  # width of the query stream (qformer, perceiver)
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0


@dataclass
class LanguageConfig:
    model: str = ""  # hub name or local path; "" builds a tiny LM of `family` with a tokenizer trained on the data
    family: str = "t5"  # tiny LM's transformers family: t5 | gpt2 | llama
    train: str = "full"  # full | frozen
    hidden_size: int = 128  # tiny LM only
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1000  # tiny tokenizer's target size
    max_prompt_tokens: int = 48
    max_target_tokens: int = 40


@dataclass
class DataConfig:
    train: str = "synthetic"  # dataset name or path to a JSONL file of image, question|caption, answers
    eval: str = "synthetic"
    seed: int = 0  # synthetic world only: the same world (and test set) whatever train.seed is
    train_images: int = 6000  # synthetic world only
    eval_images: int = 400  # synthetic world only
    questions_per_image: int = 3  # synthetic world only
    captions: bool = True  # train and evaluate captioning too (synthetic world)
    prompt: str = "Question: {question} Answer:"
    caption_prompt: str = "A short caption:"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where supported, else fp16 + scaler, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    log_every: int = 25
    eval_every: int = 250  # 0: no evaluation during training
    eval_examples: int = 256  # size of the validation sample used during training
    save_every: int = 500  # 0: save only at the end


@dataclass
class EvalConfig:
    split: str = "test"
    max_examples: int = 0  # 0: every example of the split
    batch_size: int = 64
    max_new_tokens: int = 10  # VQA answers are short
    caption_max_new_tokens: int = 32
    min_new_tokens: int = 0
    num_beams: int = 1
    shuffled_control: bool = True  # also score each example with another image of the set
    caption_metrics: bool = True  # BLEU/METEOR/ROUGE-L/CIDEr (needs Java)


@dataclass
class Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _parse(text: str, kind: type, key: str):
    """Turns the text of an override into a value of the field's type."""
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key} expects {kind.__name__}, got {text!r}") from None


def set_field(cfg: Config, key: str, value) -> None:
    """Sets `section.field` to `value` (a string is parsed to the field's type; anything else is type-checked)."""
    section_name, _, field_name = key.partition(".")
    if section_name not in SECTIONS or not field_name:
        raise ConfigError(f"unknown config section in {key!r}; valid sections: {', '.join(SECTIONS)}")
    section = getattr(cfg, section_name)
    kinds = typing.get_type_hints(type(section))
    if field_name not in kinds:
        raise ConfigError(f"unknown config key {key!r}; valid keys of {section_name}: {', '.join(kinds)}")
    kind = kinds[field_name]
    if isinstance(value, str) and kind is not str:
        value = _parse(value, kind, key)
    elif kind is float and type(value) is int:
        value = float(value)
    elif type(value) is not kind:
        raise ConfigError(f"{key} expects {kind.__name__}, got {value!r}")
    setattr(section, field_name, value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `section.field=value` strings in order; returns the same config for chaining."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        set_field(cfg, key.strip(), value.strip())
    return cfg


def from_dict(data: dict, base: Config | None = None) -> Config:
    """Builds a config from nested dicts (a YAML file's content), checking every key and type."""
    cfg = base if base is not None else Config()
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for section_name, values in data.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"unknown config section {section_name!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section_name!r} must be a mapping of fields")
        for field_name, value in values.items():
            set_field(cfg, f"{section_name}.{field_name}", value)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def merge_config_file(path: Path, base: Config | None = None) -> Config:
    """Applies a YAML file's sections and fields over `base` (a fresh default config when None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    return from_dict(data, base)


def load_config(path: Path) -> Config:
    return merge_config_file(path)
