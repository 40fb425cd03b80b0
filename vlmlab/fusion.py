"""Gated cross-attention fusion for decoder-only LMs (Flamingo style).

With `language.fusion=cross_attention` the visual tokens do not enter the LM's sequence as a prefix. Instead a new
block sits in front of every k-th decoder layer (`language.cross_attention_every=k`; layers 0, k, 2k, ...):

    h = h + tanh(a) * CrossAttention(LayerNorm(h), visual)      visual: [B, M, D], h: [B, T, D]
    h = h + tanh(f) * FeedForward(LayerNorm(h))

with the gates `a` and `f` initialised at zero, so the LM starts exactly as it was and opens the gates as training
finds the image useful. Each text position reads every visual token at every fused layer, which a short prefix
read only through self-attention cannot guarantee.

The blocks are our own modules, attached to the unchanged `transformers` LM by forward pre-hooks on its decoder
layers. That keeps the LM's own weights, `save_pretrained`, `generate` and its KV cache untouched (the update of
a position depends only on that position and the visual tokens, so cached keys and values stay exact), and it
keeps the blocks outside the LM: a frozen or LoRA-tuned LM leaves them trainable.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vlmlab.config import ConfigError
from vlmlab.connectors import Attention, feed_forward
from vlmlab.registry import lookup

FUSION_FILE = "fusion.safetensors"


class GatedCrossAttentionBlock(nn.Module):
    """Text hidden states `[B, T, D]` read the visual tokens `[B, M, D]` through tanh gates that start closed."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads, dropout=0.0)
        self.ff = feed_forward(dim, dropout=0.0)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        hidden = hidden + torch.tanh(self.attention_gate) * self.attention(self.attention_norm(hidden), visual)
        return hidden + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(hidden))

    def gates(self) -> tuple[float, float]:
        """How open the two gates are: tanh of each, in [-1, 1]."""
        return float(torch.tanh(self.attention_gate.detach())), float(torch.tanh(self.ff_gate.detach()))


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: the module list as long as its config's layer count (GPT-2's `h`,
    Llama's `layers`), found the same way whatever wraps the LM (a peft model included)."""
    count = lm.config.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(lm).__name__}: no list of {count} decoder layers found for cross-attention fusion")


class CrossAttentionFusion(nn.Module):
    """Gated cross-attention blocks hooked in front of every `every`-th decoder layer of a causal LM.

    `attend_to(visual)` sets the visual tokens the next forward passes read (a training step, or every step of a
    `generate` call). They stay set afterwards on purpose: gradient checkpointing runs the layers again during
    the backward pass and must read the same tokens.
    """

    def __init__(self, lm: nn.Module, every: int):
        super().__init__()
        if every < 1:
            raise ConfigError(f"language.cross_attention_every={every} is not allowed; it must be at least 1")
        layers = decoder_layers(lm)
        dim = lm.get_input_embeddings().embedding_dim
        self.layer_indices = list(range(0, len(layers), every))
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, lm.config.num_attention_heads) for _ in self.layer_indices
        )
        for block, index in zip(self.blocks, self.layer_indices):
            layers[index].register_forward_pre_hook(partial(self._before_layer, block), with_kwargs=True)
        self.visual: torch.Tensor | None = None

    def attend_to(self, visual: torch.Tensor) -> None:
        self.visual = visual  # [B, M, D]

    def _before_layer(self, block: GatedCrossAttentionBlock, layer: nn.Module, args: tuple, kwargs: dict):
        if self.visual is None:
            raise RuntimeError("cross-attention fusion: no visual tokens set (call attend_to first)")
        hidden = args[0] if args else kwargs["hidden_states"]  # [B', T, D]
        visual = self.visual
        if visual.shape[0] != hidden.shape[0]:
            # Beam search repeats each example's rows in place (num_beams copies each): follow it.
            visual = visual.repeat_interleave(hidden.shape[0] // visual.shape[0], dim=0)
        hidden = block(hidden, visual.to(hidden.dtype))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def gates(self) -> list[tuple[float, float]]:
        return [block.gates() for block in self.blocks]


def _prefix(lm: nn.Module, every: int, is_encoder_decoder: bool) -> None:
    return None  # the visual tokens lead the LM's sequence; nothing to add


def _cross_attention(lm: nn.Module, every: int, is_encoder_decoder: bool) -> CrossAttentionFusion:
    if is_encoder_decoder:
        raise ConfigError("language.fusion=cross_attention is for decoder-only LMs; an encoder-decoder LM (T5) "
                          "already reads the visual tokens through its own cross-attention: use prefix")
    return CrossAttentionFusion(lm, every)


FUSIONS = {"prefix": _prefix, "cross_attention": _cross_attention}


def build_fusion(kind: str, lm: nn.Module, every: int, is_encoder_decoder: bool) -> CrossAttentionFusion | None:
    """None for `prefix`; gated cross-attention blocks hooked into `lm` for `cross_attention`."""
    return lookup(FUSIONS, kind, "language.fusion")(lm, every, is_encoder_decoder)
