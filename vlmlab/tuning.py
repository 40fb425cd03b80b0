"""How the vision tower and the language model are trained: `full`, `frozen`, `lora` or `dora` (per part).

LoRA and DoRA come from `peft`: the part's transformers model is wrapped in a `PeftModel` whose base weights stay
frozen while small low-rank adapters (DoRA: plus a magnitude vector) on chosen linear layers train. Which layers
is a property of the checkpoint's family, read from its own `config.model_type`, never guessed from its name:
`<part>.lora_targets=attention` adapts the attention projections, `attention+mlp` the feed-forward too, and a
comma-separated list names modules directly (for a family not listed here).

A part whose base weights do not change (frozen, lora, dora) and that was loaded by name (`<part>.model=`) is
saved by reference: the saved model keeps that name and only the adapter's weights, so a LoRA-tuned part takes a
few megabytes, and loading rebuilds the base from the name and puts the adapter back on it, exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from vlmlab.config import Config, ConfigError
from vlmlab.loading import WEIGHT_DTYPES, read_exact
from vlmlab.registry import lookup

TUNING_MODES = ("full", "frozen", "lora", "dora")
ADAPTED = ("lora", "dora")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: `PeftModel.from_pretrained` reads the folder
OWN_WEIGHTS = "part.safetensors"  # a part's modules outside its transformers model (e.g. fusion blocks)

_LLAMA_STYLE = {"attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", "mlp": r"mlp\.(gate_proj|up_proj|down_proj)"}
# Only the encoder's layers: SigLIP's pooling head has linears of the same names, and vlmlab never uses its output.
_VIT_STYLE = {"attention": r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
              "mlp": r"encoder\.layers\.\d+\.mlp\.(fc1|fc2)"}
_BLIP_VIT = {"attention": r"encoder\.layers\.\d+\.self_attn\.(qkv|projection)",
             "mlp": r"encoder\.layers\.\d+\.mlp\.(fc1|fc2)"}
# Per family (`config.model_type`): patterns for the end of a module's path (joined into one regex for peft).
LORA_TARGETS = {
    # T5 / Flan-T5: self- and cross-attention projections q, k, v, o; feed-forward wi (wi_0, wi_1 when gated), wo.
    "t5": {"attention": r"(SelfAttention|EncDecAttention)\.(q|k|v|o)", "mlp": r"DenseReluDense\.(wi|wi_0|wi_1|wo)"},
    # GPT-2 names its attention and MLP output projections both c_proj: the parent module tells them apart.
    "gpt2": {"attention": r"attn\.(c_attn|c_proj)", "mlp": r"mlp\.(c_fc|c_proj)"},
    "llama": _LLAMA_STYLE,  # SmolLM2 is a Llama
    "qwen2": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "clip_vision_model": _VIT_STYLE,
    "siglip_vision_model": _VIT_STYLE,
    # BLIP-2's / InstructBLIP's ViT (EVA): one fused qkv projection per block
    "blip_2_vision_model": _BLIP_VIT,
    "instructblip_vision_model": _BLIP_VIT,
    # OPT (BLIP-2's decoder-only LMs): its feed-forward fc1, fc2 sit in the decoder layer itself
    "opt": {"attention": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", "mlp": r"layers\.\d+\.(fc1|fc2)"},
}
# GPT-2 stores its linear layers as transformers' Conv1D, weight [in, out], the transpose of nn.Linear's.
FAN_IN_FAN_OUT = {"gpt2"}
TARGET_GROUPS = ("attention", "attention+mlp")


def check_modes(config: Config) -> None:
    """Refuses an unknown mode, or an adapter on a part built from scratch, before anything is built or loaded."""
    for part in ("vision", "language"):
        section = getattr(config, part)
        if section.train not in TUNING_MODES:
            raise ConfigError(f"{part}.train={section.train!r} is not allowed; valid: {', '.join(TUNING_MODES)}")
        pretrained = section.model or getattr(section, "pretrain_steps", 0)  # a tiny LM pretrained first counts
        if section.train in ADAPTED and not pretrained:
            raise ConfigError(f"{part}.train={section.train} adapts a pretrained model: set {part}.model= to a hub "
                              f"name or a local path (a {part} part built from scratch trains in full)")
        if section.dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"{part}.dtype={section.dtype!r} is not allowed; valid: {', '.join(WEIGHT_DTYPES)}")
        if section.dtype != "fp32" and section.train == "full":
            raise ConfigError(f"{part}.dtype={section.dtype} with {part}.train=full: weights that train stay fp32 "
                              f"(mixed precision lowers the compute, not them); use it with frozen, lora or dora")
        if section.train in ADAPTED and (section.lora_rank < 1 or section.lora_alpha < 1
                                         or not 0 <= section.lora_dropout < 1):
            raise ConfigError(f"{part}.lora_rank={section.lora_rank}, lora_alpha={section.lora_alpha}, lora_dropout="
                              f"{section.lora_dropout}: rank and alpha must be at least 1, dropout in [0, 1)")


def saved_by_reference(section) -> bool:
    """True when a part's weights are those of its named checkpoint (plus an adapter): save the name, not them."""
    return bool(section.model) and section.train in ("frozen", *ADAPTED)


def target_modules(model: nn.Module, spec: str, part: str) -> str | list[str]:
    """peft's `target_modules`: a regex that must match a module's whole path, or names that end one."""
    if spec in TARGET_GROUPS:
        family = lookup(LORA_TARGETS, model.config.model_type,
                        f"{part} family for LoRA targets (name the modules in {part}.lora_targets=a,b,c instead)")
        groups = [family["attention"]] + ([family["mlp"]] if spec == "attention+mlp" else [])
        return rf"(.*\.)?({'|'.join(groups)})"  # any prefix: transformers 5 drops CLIP's `vision_model.`
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{part}.lora_targets is empty; valid: {', '.join(TARGET_GROUPS)}, or module names a,b,c")
    return names


def lora_config(model: nn.Module, section, part: str) -> LoraConfig:
    return LoraConfig(
        r=section.lora_rank,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=target_modules(model, section.lora_targets, part),
        use_dora=section.train == "dora",
        fan_in_fan_out=model.config.model_type in FAN_IN_FAN_OUT,
    )


def apply_tuning(part: nn.Module, section, name: str) -> None:
    """Sets how `part` (a VisionTower or LanguageModel, whose `.model` is the transformers model) is trained."""
    if section.train in ADAPTED:
        config = lora_config(part.model, section, name)
        try:
            with warnings.catch_warnings():  # peft asks transformers 5 for a property it renamed: noise on every run
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                part.model = get_peft_model(part.model, config)  # freezes the base, adds trainable adapters
        except ValueError as err:  # peft: none of the target modules exists in this model
            raise ConfigError(f"{name}.lora_targets={section.lora_targets!r}: {str(err).splitlines()[0]}") from None
    else:
        part.requires_grad_(section.train == "full")


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, PeftModel)


def save_adapter(model: PeftModel, directory: Path) -> None:
    """The adapter alone, in peft's format: `adapter_config.json` (base name included) and its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(directory)
    state = {key: tensor.detach().contiguous().cpu() for key, tensor in adapter_state(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS)


def adapter_state(model: PeftModel) -> dict:
    """The adapter's weights by the names peft saves them under. Never the embeddings: vlmlab never resizes a
    vocabulary, and peft's check whether it was ("auto") asks the hub for the base's config.json at its default
    branch, a network call at every save that ignores `<part>.revision`."""
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter(model: PeftModel, directory: Path) -> None:
    """Puts saved adapter weights back on a freshly adapted model, through loading.py's checks: only from
    safetensors (a pickled `adapter_model.bin` is refused, never read), and the file must hold exactly the adapter's
    weights at their shapes (peft's own loader would read a pickle, and skip or half-load keys that differ)."""
    expected = {key: tensor.shape for key, tensor in adapter_state(model).items()}  # as save_adapter saves them
    config = model.peft_config["default"]
    what = (f"the {'DoRA' if config.use_dora else 'LoRA'} adapter config.yaml describes (lora_rank={config.r}, "
            f"lora_targets)")
    set_peft_model_state_dict(model, read_exact(directory / ADAPTER_WEIGHTS, expected, what))


def _own_state(part: nn.Module) -> dict:
    """Weights of the part's own modules around its transformers model (e.g. fusion blocks): never in the base."""
    return {key: tensor for key, tensor in part.state_dict().items() if not key.startswith("model.")}


def save_reference(part: nn.Module, directory: Path) -> None:
    """Saves a part kept by reference: its adapter, if any, and its own modules' weights, if any; no base."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_adapted(part.model):
        save_adapter(part.model, directory)
    own = _own_state(part)
    if own:
        save_file({key: tensor.detach().contiguous().cpu() for key, tensor in own.items()}, directory / OWN_WEIGHTS)


def load_reference(part: nn.Module, directory: Path) -> None:
    """The inverse of `save_reference`, on a part freshly built from its base's name and config."""
    if is_adapted(part.model):
        load_adapter(part.model, directory)
    own = _own_state(part)
    if own:
        path = directory / OWN_WEIGHTS
        saved = load_file(path) if path.is_file() else {}
        if saved.keys() != own.keys():
            raise ValueError(f"{path} does not hold the weights of {', '.join(sorted({k.split('.')[0] for k in own}))}"
                             f" (missing {sorted(own.keys() - saved.keys())[:3]}, unexpected "
                             f"{sorted(saved.keys() - own.keys())[:3]})")
        part.load_state_dict(saved, strict=False)  # the base's keys come from its checkpoint, the rest from here


def merge_adapter(part: nn.Module) -> None:
    """Folds an adapter into its base weights (W + scale * B A): a plain transformers model again, as fast."""
    part.model = part.model.merge_and_unload()


def enable_gradient_checkpointing(parts: list[nn.Module]) -> list[str]:
    """Recomputes activations in backward for each trained transformers model in `parts`; returns their types.

    Non-reentrant checkpointing, so a frozen base with trainable adapters needs no input-gradient tricks.
    """
    enabled = []
    for part in parts:
        model = part.model
        if not any(p.requires_grad for p in model.parameters()) or not model.supports_gradient_checkpointing:
            continue
        # transformers 5 renamed gradient_checkpointing_enable; older versions only have the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        enabled.append(model.config.model_type)
    return enabled
