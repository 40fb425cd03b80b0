"""BLIP-2 and InstructBLIP checkpoints as vlmlab parts, and their Q-Former as a connector.

A transformers `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` checkpoint is one folder
holding three parts under the prefixes `vision_model.`, `qformer.` (+ `query_tokens`, `language_projection.`) and
`language_model.`. vlmlab loads each part from it alone, by the same name:
- `vision.model=CHECKPOINT`: its ViT (`Blip2VisionModel`), features `[B, 257, 1408]` after its final layer norm;
- `connector.kind=blip2|instructblip connector.init=CHECKPOINT`: its Q-Former, query tokens and language
  projection (transformers' own `Blip2QFormerModel` / `InstructBlipQFormerModel`), `[B, N, Dv]` -> `[B, 32, Dl]`;
- `language.model=CHECKPOINT`: its LM (Flan-T5, OPT, Vicuna) with the checkpoint's tokenizer.
So `VLM.load(CHECKPOINT)` evaluates BLIP-2 as it is (`as_is_config`), and every part trains, freezes, adapts,
caches and saves as any other. InstructBLIP's Q-Former also reads the instruction (the LM's prompt), tokenized by
the BERT tokenizer the checkpoint ships in `qformer_tokenizer/`.

`connector.init` may also name BERT (`bert-base-uncased`: self-attention and feed-forward from BERT, cross-attention
new, as BLIP-2 itself began) or a saved connector folder (its config; the weights come from connector.safetensors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
)
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from vlmlab.config import Config, ConfigError, ConnectorConfig
from vlmlab.loading import CheckpointError, pretrained_config, pretrained_model, pretrained_tokenizer
from vlmlab.log import info


@dataclass(frozen=True)
class Family:
    connector: str  # connector.kind of its Q-Former
    vision: type
    qformer: type
    qformer_config: type
    reads_prompt: bool  # InstructBLIP: the Q-Former reads the instruction beside its queries


FAMILIES = {  # by the checkpoint's config.model_type
    "blip-2": Family("blip2", Blip2VisionModel, Blip2QFormerModel, Blip2QFormerConfig, False),
    "instructblip": Family("instructblip", InstructBlipVisionModel, InstructBlipQFormerModel,
                           InstructBlipQFormerConfig, True),
}
BY_CONNECTOR = {family.connector: family for family in FAMILIES.values()}
QFORMER_TYPES = {family.qformer_config.model_type: family for family in FAMILIES.values()}  # a saved connector
CONNECTOR_KEYS = ("query_tokens", "qformer.", "language_projection.")  # its weights' names in a checkpoint
QFORMER_TOKENIZER = "qformer_tokenizer"  # InstructBLIP's subfolder for the Q-Former's BERT tokenizer
# Where each family was evaluated by its authors: "Question: {} Short answer:" for VQAv2, no text for captions.
VQA_PROMPT = "Question: {question} Short answer:"


def family_of(config) -> Family | None:
    """The family of a transformers config, None for a checkpoint that is no BLIP-2 / InstructBLIP."""
    return FAMILIES.get(getattr(config, "model_type", ""))


# -- the vision and language parts, loaded alone from the whole checkpoint ---------------------------------------
def load_part(config, part: str, key: str, name: str, trust_remote_code: bool, revision: str,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The vision model (`part="vision"`) or LM (`"language"`) of the BLIP-2-family checkpoint `name` whose
    config is `config`: its weights under `vision_model.` / `language_model.`, the rest of the file left unread."""
    family = family_of(config)
    if part == "vision":
        model_class, sub_config, prefix = family.vision, config.vision_config, "vision_model"
    else:
        model_class = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
        sub_config, prefix = config.text_config, "language_model"
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # else a report lists every weight of the other parts as unexpected
    try:
        model = pretrained_model(model_class, key, name, trust_remote_code, revision, config=sub_config,
                                 key_mapping={rf"^{prefix}\.": ""}, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    if model.loading_info["missing_keys"]:
        missing = sorted(model.loading_info["missing_keys"])
        raise CheckpointError(f"{key}={name!r}: its {prefix} lacks {', '.join(missing[:3])} "
                              f"({len(missing)} weights missing)")
    model.loading_info["unexpected_keys"] = set()  # the other parts' weights, loaded by their own parts
    return model


# -- the connector -----------------------------------------------------------------------------------------------
class QFormerConnector(nn.Module):
    """BLIP-2's bridge: M learned queries `[1, M, Dq]` cross-attend to the tower's features `[B, N, Dv]` in
    transformers' Q-Former, then `language_projection` maps them to the LM width: `[B, M, Dl]`.

    With a `tokenizer` (InstructBLIP) the Q-Former also reads each example's prompt: its tokens `[B, T]` follow
    the queries in self-attention, and only the M query outputs go on. Attribute names are the checkpoint's, so
    its weights load by name.
    """

    def __init__(self, qformer: nn.Module, num_queries: int, lm_dim: int, tokenizer=None,
                 positions: nn.Parameter | None = None):
        super().__init__()
        width = qformer.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * qformer.config.initializer_range)
        self.qformer = qformer
        self.language_projection = nn.Linear(width, lm_dim)
        self.positions = positions  # [N, Dv], learned, for a convnet's features (which carry no position)
        self.tokenizer = tokenizer
        self.reads_prompt = tokenizer is not None

    def forward(self, features: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        batch, device = features.shape[0], features.device
        if self.positions is not None:
            features = features + self.positions
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, M, Dq]
        image_mask = torch.ones(features.shape[:2], dtype=torch.long, device=device)  # [B, N]
        if not self.reads_prompt:
            out = self.qformer(query_embeds=queries, encoder_hidden_states=features,
                               encoder_attention_mask=image_mask).last_hidden_state  # [B, M, Dq]
        else:  # no prompt (e.g. counting visual tokens): an empty instruction
            text = self.tokenizer(prompts if prompts is not None else [""] * batch, padding=True, truncation=True,
                                  max_length=self.qformer.config.max_position_embeddings, return_tensors="pt")
            ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)  # [B, T]
            mask = torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype, device=device), mask], dim=1)
            out = self.qformer(input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=features,
                               encoder_attention_mask=image_mask).last_hidden_state[:, : queries.shape[1]]
        return self.language_projection(out.to(self.language_projection.weight.dtype))

    def save_config(self, directory: Path) -> None:
        """What rebuilds this connector beside connector.safetensors: the Q-Former's config (+ its tokenizer)."""
        self.qformer.config.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def _qformer_config(cfg: ConnectorConfig, family: Family, vision_dim: int):
    """The Q-Former's transformers config: the init checkpoint's (its shape checked against `cfg`), else one of
    `cfg`'s shape (BERT-base's when cfg says 768 wide, 12 layers, 12 heads, as BLIP-2's)."""
    init = _init_config(cfg.init) if cfg.init else None
    if init is None:
        config = family.qformer_config(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                       num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.hidden_size,
                                       cross_attention_frequency=cfg.cross_attention_every)
    else:
        num_queries, config = init
        if config.model_type == "bert":
            config = family.qformer_config(**{k: getattr(config, k) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "layer_norm_eps", "pad_token_id")},
                cross_attention_frequency=cfg.cross_attention_every)
        else:
            config = family.qformer_config(**{k: v for k, v in config.to_dict().items()
                                              if k not in ("model_type", "transformers_version", "architectures")})
        shape = {"num_queries": num_queries or cfg.num_queries, "hidden_size": config.hidden_size,
                 "num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
                 "cross_attention_every": config.cross_attention_frequency}
        wrong = [f"connector.{k}={v}" for k, v in shape.items() if getattr(cfg, k) != v]
        if wrong:
            raise ConfigError(f"connector.init={cfg.init!r} is a Q-Former of another shape: set {' '.join(wrong)}")
    config.encoder_hidden_size = vision_dim  # cross-attention keys and values read the tower's features
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.dropout
    return config


def _init_config(name: str):
    """(number of queries or None, Q-Former config or BERT config) of what `connector.init` names."""
    config = pretrained_config("connector.init", name, False)
    if family_of(config) is not None:
        return config.num_query_tokens, config.qformer_config
    if config.model_type in QFORMER_TYPES or config.model_type == "bert":
        return None, config
    raise ConfigError(f"connector.init={name!r} is a {config.model_type!r} checkpoint; valid: a BLIP-2 or "
                      f"InstructBLIP checkpoint, a saved blip2/instructblip connector, or a BERT model")


def build_qformer_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int,
                            positions: nn.Parameter | None = None) -> QFormerConnector:
    """connector.kind=blip2 | instructblip: built to `cfg`'s shape, its weights from `cfg.init` when it names a
    checkpoint that has them (a saved connector's come from connector.safetensors instead, in `VLM.load`);
    `positions` `[N, Dv]` are added to the features first (connectors.py gives them to a convnet's)."""
    family = BY_CONNECTOR[cfg.kind]
    tokenizer = None
    if family.reads_prompt:
        if not cfg.init:
            raise ConfigError("connector.kind=instructblip reads the prompt with the tokenizer of a pretrained "
                              "Q-Former: set connector.init= to an InstructBLIP checkpoint")
        tokenizer = _qformer_tokenizer(cfg.init)
    connector = qformer_connector(cfg, vision_dim, lm_dim, tokenizer, positions)
    if cfg.init:
        _load_init(connector, cfg.init)
    return connector


def qformer_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, tokenizer=None,
                      positions: nn.Parameter | None = None) -> QFormerConnector:
    """A connector of `cfg`'s shape (checked against `cfg.init`'s when set), weights fresh; `plan` builds it on the
    meta device with `cfg.init` cleared, so that nothing is read."""
    family = BY_CONNECTOR[cfg.kind]
    qformer = family.qformer(_qformer_config(cfg, family, vision_dim))
    return QFormerConnector(qformer, cfg.num_queries, lm_dim, tokenizer, positions)


def _qformer_tokenizer(name: str):
    if (Path(name) / "tokenizer_config.json").is_file():  # a saved connector folder
        return pretrained_tokenizer("connector.init", name, False)
    found = _file(name, f"{QFORMER_TOKENIZER}/tokenizer_config.json")
    if found is None:
        raise ConfigError(f"connector.init={name!r} has no {QFORMER_TOKENIZER}/ (InstructBLIP's Q-Former tokenizer)")
    for extra in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):  # beside it, fetched from the hub too
        _file(name, f"{QFORMER_TOKENIZER}/{extra}")
    return pretrained_tokenizer("connector.init", str(found.parent), False)


def _weights(name: str, wanted) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint `name` whose names `wanted(name)` accepts, read one by one from its safetensors
    shards (a 4B-parameter checkpoint's LM is never read for its Q-Former)."""
    index = _file(name, "model.safetensors.index.json")
    if index is None:
        files = ["model.safetensors"]
    else:  # only the shards that hold wanted tensors are downloaded
        files = sorted({file for key, file in json.loads(index.read_text())["weight_map"].items() if wanted(key)})
    tensors = {}
    for file in files:
        path = _file(name, file)
        if path is None:
            raise CheckpointError(f"connector.init={name!r} has no {file} (weights load only from safetensors)")
        with safe_open(path, "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys() if wanted(key)})
    return tensors


BERT_TO_QFORMER = [  # BERT's layer names (without "bert.") -> the Q-Former's
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"qformer.encoder.layer.\1.attention.attention."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.", r"qformer.encoder.layer.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.", r"qformer.encoder.layer.\1.intermediate_query."),
    (r"^encoder\.layer\.(\d+)\.output\.", r"qformer.encoder.layer.\1.output_query."),
]


def _from_bert(state: dict[str, torch.Tensor], text_input: bool) -> dict[str, torch.Tensor]:
    """BERT's weights under the Q-Former's names; `text_input` (InstructBLIP): its word and position embeddings
    and a second copy of each feed-forward for the text tokens, which have one of their own."""
    mapped = {}
    for key, tensor in state.items():
        bare = re.sub(r"^bert\.", "", key)
        for pattern, target in BERT_TO_QFORMER:
            if re.match(pattern, bare):
                mapped[re.sub(pattern, target, bare)] = tensor
                if text_input and "_query." in target:
                    mapped[re.sub(pattern, target.replace("_query.", "."), bare)] = tensor
        if bare.startswith("embeddings.LayerNorm."):
            norm = "qformer.embeddings.layernorm." if text_input else "qformer.layernorm."
            mapped[bare.replace("embeddings.LayerNorm.", norm)] = tensor
        elif text_input and bare.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
            mapped[f"qformer.{bare}"] = tensor
    return mapped


def _load_init(connector: QFormerConnector, name: str) -> None:
    """Copies what `connector.init` has into `connector`; says in one line what stays newly initialised."""
    config = pretrained_config("connector.init", name, False)
    if config.model_type in QFORMER_TYPES:
        return  # a saved connector folder: its weights are connector.safetensors', loaded by VLM.load
    if config.model_type == "bert":
        state = _from_bert(_weights(name, lambda key: "pooler" not in key and "cls." not in key),
                           connector.reads_prompt)
    else:
        state = _weights(name, lambda key: key.startswith(CONNECTOR_KEYS))
    own = connector.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    connector.load_state_dict(fits, strict=False)
    fresh = sorted(k for k in own if k not in fits)
    if fresh:
        info(f"connector.init={name!r}: {len(fits)} of {len(own)} tensors loaded; newly initialised: "
             f"{_summarise(fresh)}")
    else:
        info(f"connector.init={name!r}: all {len(own)} tensors loaded")


def _summarise(keys: list[str]) -> str:
    """Layer-indexed names folded into one (`layer.*.crossattention.attention.key.weight`), at most six shown."""
    folded = sorted({re.sub(r"\.\d+\.", ".*.", key) for key in keys})
    return ", ".join(folded[:6]) + (f" and {len(folded) - 6} more" if len(folded) > 6 else "")


# -- a whole checkpoint as a vlmlab model --------------------------------------------------------------------------
def half_precision(device: torch.device) -> str:
    """The `<part>.dtype` frozen parts take on `device`: bf16 where the GPU has it, fp16 on other GPUs (a T4),
    fp32 on a CPU (whose half-precision kernels are slow or missing)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def as_is_config(name: str, revision: str = "", dtype: str = "fp32") -> Config:
    """The vlmlab config that evaluates BLIP-2 / InstructBLIP checkpoint `name` as it was published: every part
    from it, frozen, its vision and language weights in `dtype`; its own image processor; its authors' VQAv2
    prompt and decoding (beam 5, 1-10 new tokens)."""
    checkpoint = pretrained_config("--model", name, False, revision)
    family = family_of(checkpoint)
    if family is None:
        raise ConfigError(f"{name}: a {checkpoint.model_type!r} checkpoint, not a vlmlab model nor one of "
                          f"{', '.join(FAMILIES)}")
    qformer = checkpoint.qformer_config
    connector = ConnectorConfig(kind=family.connector, num_queries=checkpoint.num_query_tokens,
                                hidden_size=qformer.hidden_size, num_layers=qformer.num_hidden_layers,
                                num_heads=qformer.num_attention_heads, dropout=0.0, init=name,
                                cross_attention_every=qformer.cross_attention_frequency)
    return checkpoint_config(name, connector, *family_prompts(name, checkpoint, revision), revision, dtype)


def checkpoint_config(name: str, connector: ConnectorConfig, vqa_prompt: str = VQA_PROMPT, caption_prompt: str = "",
                      revision: str = "", dtype: str = "fp32") -> Config:
    """Every part from checkpoint `name`, vision and LM frozen in `dtype`, the Q-Former `connector`; its image
    processor, prompts and its authors' decoding (beam 5, 1 to 10 new tokens). The presets write `connector` out."""
    cfg = Config()
    for part in (cfg.vision, cfg.language):
        part.model, part.revision, part.train, part.dtype = name, revision, "frozen", dtype
    cfg.connector = connector
    cfg.data.image_processor = name  # its own resizing (224 px, bicubic); the tower normalises as it did
    cfg.data.prompt, cfg.data.caption_prompt = vqa_prompt, caption_prompt
    cfg.language.max_prompt_tokens = 128
    cfg.eval.num_beams, cfg.eval.min_new_tokens, cfg.eval.max_new_tokens = 5, 1, 10
    return cfg


def family_prompts(name: str, checkpoint, revision: str = "") -> tuple[str, str]:
    """(VQA template, caption prompt) as the checkpoint's processor writes them: a decoder-only LM's tokenizer
    opens the text with its BOS (OPT's `</s>`), which vlmlab, adding no special tokens, must write out."""
    bos = ""
    if checkpoint.use_decoder_only_language_model:
        bos = pretrained_tokenizer("language.model", name, False, revision).bos_token or ""
    return bos + VQA_PROMPT, bos


def is_checkpoint(name: str, revision: str = "") -> bool:
    """True when `name` (a path, or a hub id whose config.json is reachable) is a BLIP-2-family transformers
    checkpoint; a vlmlab model folder has no config.json at its top."""
    path = _file(name, "config.json", revision)
    return path is not None and json.loads(path.read_text()).get("model_type") in FAMILIES


def _file(name: str, filename: str, revision: str = "") -> Path | None:
    """File `filename` of a local folder or hub checkpoint (downloaded if need be); None where there is none."""
    try:
        path = cached_file(str(name), filename, revision=revision or None)
    except (OSError, ValueError):
        return None
    return None if path is None else Path(path)
