"""Named presets: plain functions returning a full `Config`. `vlmlab presets` lists them with their first doc line."""

from __future__ import annotations

from vlmlab.config import Config
from vlmlab.registry import lookup


def default() -> Config:
    """Tiny CLIP-style ViT -> Q-Former (16 queries) -> tiny T5, from scratch on the synthetic world; CPU, minutes."""
    return Config()


def tiny_gpt2() -> Config:
    """The seed's decoder-only layout in tiny: tiny ViT -> Q-Former -> tiny GPT-2 (visual prefix), synthetic world."""
    cfg = Config()
    cfg.language.family = "gpt2"
    return cfg


def tiny_llama() -> Config:
    """Tiny ViT -> Q-Former -> tiny Llama-style causal LM (visual prefix), synthetic world."""
    cfg = Config()
    cfg.language.family = "llama"
    return cfg


PRESETS = {"default": default, "tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}


def get_preset(name: str) -> Config:
    return lookup(PRESETS, name, "preset")()


def describe_presets() -> list[str]:
    return [f"{name:<12} {builder.__doc__.splitlines()[0]}" for name, builder in PRESETS.items()]
