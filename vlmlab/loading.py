"""Loading pretrained parts by hub name or local path, safely.

- Weights come only from safetensors files: a checkpoint that ships only a pickle (`pytorch_model.bin`) is refused,
  since unpickling can run any code.
- Code shipped with a checkpoint runs only when the config asks for it (`vision.trust_remote_code`,
  `language.trust_remote_code`); transformers refuses such checkpoints otherwise.
- Weights whose shapes do not fit the architecture are an error, never silently re-initialised; the model carries
  transformers' `loading_info` (missing / unexpected keys) so that a caller that must load a complete checkpoint
  (`VLM.load`) can refuse an incomplete one.

Every failure is one line that names the config key and the value that caused it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer


# `<part>.dtype`: the dtype a part's weights are loaded in. A half-precision base must not train (mixed precision
# keeps the weights that train in fp32); a frozen one takes half the memory, as BLIP-2 on a T4 needs.
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """Saved weights that do not fit the architecture they are loaded into; the message says where and how."""


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _cannot_load(key: str, name: str, err: Exception) -> CheckpointError:
    hint = ""
    if "trust_remote_code" in str(err):
        hint = f" (it ships its own code; set {key.split('.')[0]}.trust_remote_code=true only if you trust it)"
    elif "safetensors" in str(err):
        hint = " (vlmlab loads weights only from safetensors files, never from pickles)"
    return CheckpointError(f"{key}={name!r} cannot be loaded: {_first_line(err)}{hint}")


def _gguf(gguf_file: str) -> dict:
    """from_pretrained's option for a GGUF checkpoint; transformers reads it only when the `gguf` package is there."""
    if not gguf_file:
        return {}
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError(f"language.gguf_file={gguf_file!r} needs the gguf package: pip install gguf") from None
    return {"gguf_file": gguf_file}


def pretrained_config(key: str, name: str, trust_remote_code: bool, revision: str = "", gguf_file: str = ""):
    """The transformers config of checkpoint `name` at hub `revision` ("": the default branch), or of its GGUF file
    `gguf_file`; `key` is the config field that named it (for messages)."""
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision or None,
                                          **_gguf(gguf_file))
    except (OSError, ValueError) as err:
        raise _cannot_load(key, name, err) from None


def pretrained_tokenizer(key: str, name: str, trust_remote_code: bool, revision: str = "", gguf_file: str = ""):
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision or None,
                                             **_gguf(gguf_file))
    except (OSError, ValueError) as err:
        raise _cannot_load(key, name, err) from None


def pretrained_model(model_class, key: str, name: str, trust_remote_code: bool, revision: str = "",
                     gguf_file: str = "", **options):
    """`model_class.from_pretrained(name, revision=, **options)` from safetensors only, or from the GGUF file
    `gguf_file` (a tensor format that runs no code when read, as safetensors); refuses weights of the wrong shape.
    `options` e.g. `config=` and `key_mapping=` load one part of a composite checkpoint (blip2.py).

    Returns the model with `loading_info` set: transformers' `missing_keys` and `unexpected_keys` (sets of names).
    """
    try:
        model, info = model_class.from_pretrained(
            name,
            trust_remote_code=trust_remote_code,
            revision=revision or None,  # a local path ignores it
            use_safetensors=None if gguf_file else True,
            output_loading_info=True,
            **_gguf(gguf_file),
            ignore_mismatched_sizes=True,  # reported below as an error that names the keys, not as a bare report
            **options,
        )
    except (OSError, ValueError, SafetensorError) as err:
        raise _cannot_load(key, name, err) from None
    if gguf_file:
        _unmark_gguf(model, gguf_file)
    if info["mismatched_keys"]:
        raise CheckpointError(f"{key}={name!r}: weights do not fit the checkpoint's config.json "
                              f"({_key_report([], [], sorted(info['mismatched_keys']))})")
    model.loading_info = {"missing_keys": set(info["missing_keys"]), "unexpected_keys": set(info["unexpected_keys"])}
    return model


def _unmark_gguf(model: nn.Module, gguf_file: str) -> None:
    """transformers reads a GGUF file's weights dequantised into ordinary float tensors, yet leaves the model marked
    as GGUF-quantised: save_pretrained would refuse it and a saved config.json would ask for the file again. The
    weights are plain, so the mark goes; packed blocks (transformers' GGUF kernels) cannot train and are refused."""
    if any(not param.is_floating_point() for param in model.parameters()):
        raise CheckpointError(f"language.gguf_file={gguf_file!r}: its weights stayed in packed GGUF blocks, "
                              "which cannot train; vlmlab needs them dequantised")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _key_report(missing: list[str], unexpected: list[str], mismatched: list[tuple]) -> str:
    """A one-line account of how saved weights differ from a model's, at most three names of each kind."""

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    if mismatched:
        parts.append("shape of " + few([f"{k} {list(saved)} saved, {list(built)} expected"
                                        for k, saved, built in mismatched]))
    return "; ".join(parts)


def refuse_incomplete(model: nn.Module, where: Path) -> None:
    """Raises when `pretrained_model` reported weights missing from (or left over in) a checkpoint at `where`."""
    info = getattr(model, "loading_info", None)
    if info and (info["missing_keys"] or info["unexpected_keys"]):
        report = _key_report(sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), [])
        raise CheckpointError(f"{where}: weights do not match its config.json ({report})")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: never read


def read_exact(path: Path, expected: dict[str, torch.Size], config_summary: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, whose keys and shapes must be exactly `expected`'s (name -> shape;
    `config_summary` says what they must fit, for the message). A pickle in its place is refused, never opened."""
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob(f"{path.stem}.*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{path.parent / pickles[0]}: refused, a pickle can run code when loaded; vlmlab "
                                  f"reads weights only from safetensors files ({path.name})")
    try:
        saved = load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    mismatched = [(k, saved[k].shape, expected[k])
                  for k in sorted(saved.keys() & expected.keys()) if saved[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{path} does not fit {config_summary}: {_key_report(missing, unexpected, mismatched)}")
    return saved


def load_exact(module: nn.Module, path: Path, config_summary: str) -> None:
    """Loads the safetensors file `path` into `module`, whose every key and shape must match the file's."""
    module.load_state_dict(read_exact(path, {k: v.shape for k, v in module.state_dict().items()}, config_summary))
