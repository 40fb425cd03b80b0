"""The one nested config: vision / connector / language / data / train / eval.

Presets are plain functions returning a `Config` (see presets.py). Users change it with `section.field=value`
overrides or a YAML file; both go through `set_field`, which checks the section, the field and the value's type,
and names what is allowed when something is wrong. The resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
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
    train: str = "full"  # full | frozen | lora | dora (lora/dora need model=)
    lora_rank: int = 16  # train=lora|dora: rank r of the adapters
    lora_alpha: int = 32  # adapter scale alpha / r
    lora_dropout: float = 0.05
    lora_targets: str = "attention"  # attention | attention+mlp | comma-separated module names
    feature_layer: int = -1  # index into the tower's hidden states; -2 is the usual LLaVA choice
    image_size: int = 64  # tiny tower, or a pretrained tower whose config names no size (convnets)
    patch_size: int = 8  # tiny ViT only
    hidden_size: int = 128  # tiny tower: ViT width, or a ResNet's last stage width
    num_layers: int = 3  # tiny tower: ViT layers or ResNet stages
    num_heads: int = 4  # tiny ViT only
    trust_remote_code: bool = False  # run code shipped with a hub checkpoint; only for checkpoints you trust
    revision: str = ""  # hub branch, tag or commit of vision.model ("": the default branch); a local path has none
    dtype: str = "fp32"  # its weights: fp32 | fp16 | bf16 (half: frozen / LoRA / DoRA bases only, half the memory)
    # Written by vlmlab, not an option: what vision.model resolved to when the run began, `commit:<hub commit>` or
    # `sha256:<hash of the local folder's files>` ("": built from scratch). Loading a saved model compares it.
    resolved: str = ""


@dataclass
class ConnectorConfig:
    kind: str = "qformer"  # qformer | perceiver | mlp | linear | blip2 | instructblip (transformers' Q-Formers)
    num_queries: int = 16  # visual tokens handed to the LM (qformer, perceiver)
    hidden_size: int = 128  # width of the query stream (qformer, perceiver)
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    cross_attention_every: int = 2  # blip2 | instructblip: cross-attention to the image in layers 0, k, 2k, ...
    # mlp | linear on a convnet's map: k x k cells -> one token of k*k times the width (pixel shuffle; 1: off),
    # k*k times fewer tokens for the LM, so a higher resolution costs it nothing more
    merge: int = 1
    coords: bool = False  # mlp | linear on a convnet's map: each cell's x, y in [-1, 1] appended (CoordConv)
    # blip2 | instructblip: where the Q-Former's weights begin, a BLIP-2 / InstructBLIP checkpoint (hub name or
    # path; cross-attention keys and values new where the tower's width differs) or a BERT model ("": from scratch)
    init: str = ""


@dataclass
class LanguageConfig:
    model: str = ""  # hub name or local path; "" builds a tiny LM of `family` with a tokenizer trained on the data
    family: str = "t5"  # tiny LM's transformers family: t5 | gpt2 | llama
    train: str = "full"  # full | frozen | lora | dora (lora/dora need model=)
    lora_rank: int = 16  # train=lora|dora: rank r of the adapters
    lora_alpha: int = 32  # adapter scale alpha / r
    lora_dropout: float = 0.05
    lora_targets: str = "attention"  # attention | attention+mlp | comma-separated module names
    hidden_size: int = 128  # tiny LM only
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1000  # tiny tokenizer's target size
    max_prompt_tokens: int = 48
    max_target_tokens: int = 40
    fusion: str = "prefix"  # decoder-only LMs: prefix (visual tokens lead the text) | cross_attention (gated)
    cross_attention_every: int = 1  # fusion=cross_attention: a gated block before decoder layers 0, k, 2k, ...
    # Tiny LM only: first learn the caption language from text alone for this many steps (pretrain.py), as a
    # pretrained GPT-2 knows English; 0: off. It reads captions of `pretrain_images` scenes of another world seed.
    pretrain_steps: int = 0
    pretrain_images: int = 1500
    eos_loss_weight: float = 1.0  # weight of EOS targets in the loss; below 1 counters a bias to stop at once
    # NEFTune: in training only, uniform noise in [-a, a] on the text's input embeddings, a = alpha / sqrt(L * D)
    # per sequence of L text tokens (the visual tokens stay clean); the paper's alpha is 5 to 15; 0: off
    neftune_alpha: float = 0.0
    # Which tokens the training loss predicts: answer (the target only, the default) | all (decoder-only LMs: the
    # prompt's tokens too, as a plain LM trains; an encoder-decoder reads its prompt in the encoder, predicting none)
    loss_on: str = "answer"
    # REPRODUCTION ONLY: pad a batch's targets on the left with EOS (padding_side="left", pad == EOS, as GPT-2 is
    # often set up) and train those positions too: shorter captions then start with EOS, and the model learns to
    # say EOS first, the empty captions of the GPT-2 captioner. Never set it to train a model you mean to use.
    train_padding_as_eos: bool = False
    trust_remote_code: bool = False  # run code shipped with a hub checkpoint; only for checkpoints you trust
    revision: str = ""  # hub branch, tag or commit of language.model ("": the default branch); a local path has none
    # A GGUF file in language.model's folder or hub repo (llama.cpp's format, e.g. SmolLM2-135M-Instruct.Q4_1.gguf):
    # config, tokenizer and weights come from it, dequantised by transformers (needs the `gguf` package).
    gguf_file: str = ""
    dtype: str = "fp32"  # its weights: fp32 | fp16 | bf16 (half: frozen / LoRA / DoRA bases only, half the memory)
    # Written by vlmlab, not an option: what language.model resolved to when the run began, `commit:<hub commit>` or
    # `sha256:<hash of the local folder's files>` ("": built from scratch). Loading a saved model compares it.
    resolved: str = ""


@dataclass
class WorldConfig:
    """The built-in synthetic world's scenes. `generator=v1` (the default, for now) is the first world
    (data/synthetic.py: 64 px squares, 1-3 shapes, one word); scatter and tiles draw world v2 (data/world.py)."""

    generator: str = "v1"  # v1 | scatter (world v2) | tiles (world v2, a second, independently written generator)
    # world v2 only, from here on
    min_side: int = 48  # canvas sides in pixels, both within [min_side, max_side]
    max_side: int = 192
    max_aspect: float = 2.0  # width / height drawn (log-uniform) within [1 / max_aspect, max_aspect]
    max_objects: int = 6  # 1..max_objects objects per scene
    min_object: float = 0.12  # object side as a fraction of the canvas's short side: [min_object, max_object]
    max_object: float = 0.6
    backgrounds: str = "plain,noise,gradient"  # drawn uniformly from these
    word_rate: float = 0.6  # share of scenes with words (1 or 2, each written on or by an object)
    text_px: str = "8-11"  # font size range of the words, in canvas pixels (small type: resolution matters)
    families: str = "general,text,knowledge"  # question families asked (captions: data.captions)


@dataclass
class DataConfig:
    train: str = "synthetic"  # dataset spec: a name (vqav2, coco-captions, ...), NAME:SOURCE, a JSONL path, a mixture
    eval: str = "synthetic"
    seed: int = 0  # the synthetic world and the subsets drawn: the same test set whatever train.seed is
    train_images: int = 6000  # synthetic world only
    eval_images: int = 400  # synthetic world only
    questions_per_image: int = 3  # synthetic world only
    captions: bool = True  # train and evaluate captioning too (synthetic world)
    prompt: str = "Question: {question} Answer:"  # a template name (none, qa, instruct, short) or a template
    caption_prompt: str = "A short caption:"  # a caption prompt name (none, short, describe, photo) or a text
    train_size: int = 0  # training examples drawn (0: all), stratified by answer type; mixtures share it by weight
    eval_size: int = 0  # the same for the val / test examples
    image_resize: str = "squash"  # squash | pad (keep the aspect ratio, grey borders) | crop (centre square)
    image_processor: str = ""  # a transformers image processor (hub name or path) that resizes instead
    image_split: bool = False  # Idefics2-style: 4 crops + the whole image, 5 views through the vision tower
    # with image_split, the share of training images split; the rest show the connector their whole view only
    # (Idefics2 split half). The same images every epoch: drawn per image from its id and data.seed
    image_split_fraction: float = 1.0
    random_resize: float = 1.0  # training augmentation: shrink by a random factor in [this, 1]; 1: off
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic world's knobs: data.world.FIELD=value


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit states: a quarter of AdamW's memory; CUDA)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    init_from: str = ""  # a saved model or run directory to start from (e.g. a caption model adapted to VQA)
    precision: str = "auto"  # auto (bf16 where supported, else fp16 + scaler, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    feature_cache: str = "auto"  # tower features once per image, on disk: auto (frozen, no augmentation) | on | off
    feature_cache_dir: str = ""  # "": <out>/feature_cache; one folder can serve many runs (keyed by tower, image)
    park_tower: bool = True  # training from the cache: the tower's weights wait off the device (parking.py)
    compile: bool = False  # torch.compile the tower, connector and LM (pays off on a GPU; first steps compile)
    log_every: int = 25
    eval_every: int = 250  # 0: no evaluation during training
    eval_examples: int = 256  # size of the validation sample used during training
    save_every: int = 500  # 0: save only at the end
    alarm_every: int = 100  # check whether outputs depend on the image every this many steps (0: never)
    alarm_warmup: int = 200  # no image-reliance check before this step
    alarm_examples: int = 32  # held-out examples the check uses
    max_bad_steps: int = 20  # stop the run after this many steps in a row with a non-finite loss or gradient
    report_to: str = "none"  # experiment trackers, comma-separated: none | tensorboard | mlflow | trackio (tracking.py)


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
    image_split: bool = True  # a model that splits images: evaluate split (true) or on the whole view only (false)


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
    """Sets `section.field` (or `section.subsection.field`) to `value`: a string is parsed to the field's type,
    anything else is type-checked, and a mapping given for a subsection sets its fields one by one."""
    section_name, _, field_name = key.partition(".")
    if section_name not in SECTIONS:
        raise ConfigError(f"unknown config section in {key!r}; valid sections: {', '.join(SECTIONS)}")
    if not field_name:
        raise ConfigError(f"{key!r} names a section but no field; write {section_name}.field=value")
    _set(getattr(cfg, section_name), section_name, field_name, value)


def _set(section, path: str, field_name: str, value) -> None:
    name, _, rest = field_name.partition(".")
    kinds = typing.get_type_hints(type(section))
    key = f"{path}.{name}"
    if name not in kinds:
        raise ConfigError(f"unknown config key {key + ('.' + rest if rest else '')!r}; "
                          f"valid keys of {path}: {', '.join(kinds)}")
    kind = kinds[name]
    if dataclasses.is_dataclass(kind):
        if rest:
            return _set(getattr(section, name), key, rest, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; write {key}.field=value")
        for sub_name, sub_value in value.items():
            _set(getattr(section, name), key, str(sub_name), sub_value)
        return
    if rest:
        raise ConfigError(f"unknown config key {key}.{rest!r}; {key} is a field, not a section")
    if isinstance(value, str) and kind is not str:
        value = _parse(value, kind, key)
    elif kind is float and type(value) is int:
        value = float(value)
    elif type(value) is not kind:
        raise ConfigError(f"{key} expects {kind.__name__}, got {value!r}")
    setattr(section, name, value)


def flat_fields(cfg: Config) -> dict:
    """The config as `section.field -> value`, subsections spelled out (`data.world.generator`)."""

    def flatten(prefix: str, values: dict):
        for name, value in values.items():
            if isinstance(value, dict):
                yield from flatten(f"{prefix}{name}.", value)
            else:
                yield f"{prefix}{name}", value

    return dict(flatten("", cfg.to_dict()))

# The smallest value each numeric field allows (checked by `validate`, before any work starts, so that a wrong
# value is named at once instead of surfacing as a crash deep inside a library or as a silently broken run).
MINIMUM = {
    "vision.image_size": 1, "vision.patch_size": 1, "vision.hidden_size": 1, "vision.num_layers": 1,
    "vision.num_heads": 1, "connector.num_queries": 1, "connector.hidden_size": 1, "connector.num_layers": 0,
    "connector.num_heads": 1, "connector.dropout": 0.0, "connector.cross_attention_every": 1,
    "language.hidden_size": 1, "language.num_layers": 1,
    "language.num_heads": 1, "language.max_prompt_tokens": 2, "language.max_target_tokens": 2,
    "language.neftune_alpha": 0.0,
    "data.train_images": 1, "data.eval_images": 1, "data.questions_per_image": 0, "data.train_size": 0,
    "data.eval_size": 0, "data.world.min_side": 8, "data.world.max_objects": 1, "data.world.word_rate": 0.0,
    "train.max_steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "train.weight_decay": 0.0,
    "train.warmup_steps": 0, "train.num_workers": 0, "train.log_every": 1, "train.eval_every": 0,
    "train.eval_examples": 1, "train.save_every": 0, "train.max_bad_steps": 1,
    "language.cross_attention_every": 1, "language.eos_loss_weight": 0.0, "train.alarm_every": 0,
    "train.alarm_warmup": 0, "train.alarm_examples": 2, "language.pretrain_steps": 0, "language.pretrain_images": 1,
    "eval.max_examples": 0, "eval.batch_size": 1, "eval.max_new_tokens": 1, "eval.caption_max_new_tokens": 1,
    "eval.min_new_tokens": 0, "eval.num_beams": 1,
}
POSITIVE = ("train.lr", "train.grad_clip", "data.random_resize", "data.world.min_object")
CHOICES = {"train.precision": ("auto", "fp32", "bf16", "fp16"), "train.feature_cache": ("auto", "on", "off"),
           "language.loss_on": ("answer", "all")}
DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _value(cfg: Config, key: str):
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _refuse(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed; {allowed}")


def read_from_folder(section: VisionConfig | LanguageConfig, folder: str) -> None:
    """Points a part at a folder vlmlab saved it to: plain safetensors there, so no hub revision or GGUF file."""
    section.model, section.revision = folder, ""
    if isinstance(section, LanguageConfig):
        section.gguf_file = ""


def validate(cfg: Config) -> Config:
    """Checks values against what each field allows; raises a ConfigError naming the key, the value and the rule.

    Field types are checked when set; names chosen from a registry (families, connector kinds) when built.
    """
    for key, least in MINIMUM.items():
        if _value(cfg, key) < least:
            raise _refuse(key, _value(cfg, key), f"it must be at least {least}")
    for key in POSITIVE:
        if not _value(cfg, key) > 0:
            raise _refuse(key, _value(cfg, key), "it must be greater than 0")
    for key, choices in CHOICES.items():
        if _value(cfg, key) not in choices:
            raise _refuse(key, _value(cfg, key), f"valid: {', '.join(choices)}")
    if not DEVICES.fullmatch(cfg.train.device):
        raise _refuse("train.device", cfg.train.device, "valid: auto, cpu, cuda, cuda:N, mps")
    if cfg.connector.dropout >= 1:
        raise _refuse("connector.dropout", cfg.connector.dropout, "it must be below 1")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise _refuse("train.batch_size", cfg.train.batch_size,
                      f"it must be a multiple of train.grad_accum={cfg.train.grad_accum}")
    if cfg.language.pretrain_steps and cfg.language.model:
        raise _refuse("language.pretrain_steps", cfg.language.pretrain_steps,
                      f"it pretrains a tiny LM built from scratch, and language.model={cfg.language.model!r} is set")
    if cfg.language.gguf_file and not cfg.language.model:
        raise _refuse("language.gguf_file", cfg.language.gguf_file,
                      "it names a file in language.model's folder or hub repo, and language.model is not set")
    _check_image_split(cfg)
    if cfg.eval.min_new_tokens > cfg.eval.max_new_tokens:
        raise _refuse("eval.min_new_tokens", cfg.eval.min_new_tokens,
                      f"it must not exceed eval.max_new_tokens={cfg.eval.max_new_tokens}")
    # train.report_to's names, checked against tracking.py's registry (which imports this module)
    from vlmlab.tracking import names

    names(cfg.train.report_to)
    from vlmlab.data.world import check_world  # the world's registries of generators, backgrounds, families

    check_world(cfg.data.world)
    return cfg


# The connectors whose output length does not depend on how many views they read, so a view can be left out of
# their cross-attention (connectors.QueryResampler): what splitting only some images, or none at evaluation, needs.
MASKS_VIEWS = ("qformer", "perceiver")


def _check_image_split(cfg: Config) -> None:
    fraction = cfg.data.image_split_fraction
    if not 0 <= fraction <= 1:
        raise _refuse("data.image_split_fraction", fraction, "it must be in [0, 1] (1: every training image split)")
    if fraction < 1 and not cfg.data.image_split:
        raise _refuse("data.image_split_fraction", fraction, "it applies with data.image_split=true")
    if cfg.data.image_split and cfg.connector.kind not in MASKS_VIEWS:
        for key, value, default in (("data.image_split_fraction", fraction, 1.0),
                                    ("eval.image_split", cfg.eval.image_split, True)):
            if value != default:
                raise _refuse(key, value, f"leaving an image's crops out needs connector.kind="
                                          f"{' | '.join(MASKS_VIEWS)} (connector.kind={cfg.connector.kind!r} gives a "
                                          f"token per feature or is transformers' own)")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `section.field=value` strings in order, then checks the result (`validate`); returns the same config.

    Every command that takes overrides goes through here, so a value out of range is named before any work starts.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        set_field(cfg, key.strip(), value.strip())
    return validate(cfg)


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
