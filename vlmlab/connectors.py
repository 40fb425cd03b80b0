"""Connectors: vision features `[B, N, Dv]` -> visual tokens `[B, M, Dl]` in the language model's embedding space.

One contract, six builders in a plain dict:
- qformer: M learned queries; each layer self-attends over the queries, cross-attends to the image features and
  applies a feed-forward (BLIP-2's Q-Former, without its text branch), then a linear projection to Dl.
- perceiver: M learned latents attend to [features; latents] (Flamingo's perceiver resampler), then project.
- mlp: two-layer GELU MLP per feature (LLaVA-1.5); M = N.
- linear: one linear map per feature (LLaVA-1); M = N.
- blip2, instructblip: transformers' own BLIP-2 / InstructBLIP Q-Former, pretrained via `connector.init` (blip2.py).

A convolutional tower's features carry no position of their own (a ViT's do), so every connector gives them a
learned one; without it an MLP connector's tokens would not say where in the image each feature was.

Two options of the per-feature connectors (mlp, linear) on a convnet's map `[H, W]`:
- connector.merge=k: each k x k block of cells becomes one feature of k*k times the width (pixel shuffle,
  Idefics3 / SmolVLM), so the LM reads k*k times fewer tokens and a higher resolution costs it nothing more.
- connector.coords=true: each feature gets its cell's x and y in [-1, 1] as two more channels (CoordConv, FiLM's
  coordinate maps): a fixed, linear code of where it was, there from the first step (learned positions start at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.blip2 import BY_CONNECTOR, build_qformer_connector
from vlmlab.config import ConfigError, ConnectorConfig
from vlmlab.registry import lookup


class Attention(nn.Module):
    """Multi-head attention of x `[B, M, D]` over context `[B, N, D]` with PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"connector.hidden_size={dim} is not divisible by connector.num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries `[B, H, M, D/H]`, keys and values `[B, H, N, D/H]`."""
        batch, length, _ = x.shape
        q = self.query(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k, v = self.key_value(context).view(batch, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` bool `[B, N]`: the context positions each row may attend to (None: all)."""
        batch, length, dim = x.shape
        q, k, v = self._heads(x, context)
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, N]: every head and query
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))

    @torch.no_grad()
    def weights(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities `forward(x, context, key_mask)` uses, `[B, H, M, N]`, computed explicitly
        and apart (SDPA never returns them), so reading them leaves `forward`'s numerics as they are (evidence.py)."""
        q, k, _ = self._heads(x, context)
        scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1)


def feed_forward(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.self_norm, self.cross_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = Attention(dim, num_heads, dropout)
        self.cross_attention = Attention(dim, num_heads, dropout)
        self.ff = feed_forward(dim, dropout)

    def forward(self, queries: torch.Tensor, features: torch.Tensor, key_mask: torch.Tensor | None = None):
        normed = self.self_norm(queries)
        queries = queries + self.self_attention(normed, normed)
        queries = queries + self.cross_attention(self.cross_norm(queries), features, key_mask)
        return queries + self.ff(self.ff_norm(queries))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.latent_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads, dropout)
        self.ff = feed_forward(dim, dropout)

    def forward(self, latents: torch.Tensor, features: torch.Tensor, key_mask: torch.Tensor | None = None):
        normed = self.latent_norm(latents)
        # Latents attend to the image and to themselves in one softmax: [B, N + M, D] keys.
        if key_mask is not None:  # the latents are always there to attend to: [B, N + M]
            key_mask = torch.cat([key_mask, key_mask.new_ones(latents.shape[:2])], dim=1)
        latents = latents + self.attention(normed, torch.cat([features, normed], dim=1), key_mask)
        return latents + self.ff(self.ff_norm(latents))


def feature_positions(num_features: int, width: int) -> nn.Parameter:
    """A learned embedding per feature position `[N, width]`, starting at zero."""
    return nn.Parameter(torch.zeros(num_features, width))


class QueryResampler(nn.Module):
    """M learned queries refined by `layers` against the image features, then projected to the LM width.

    Each of the N feature positions gets a learned embedding, whatever the tower: attention alone is blind to
    order (a ViT's features carry positions already; there it is a harmless extra). With image splitting the N
    features are V views' in a row; `views` bool `[B, V]` leaves the unread views out of every cross-attention, so
    an image left whole gives M tokens from its whole view alone.
    """

    def __init__(self, layer_class, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_features: int):
        super().__init__()
        dim = cfg.hidden_size
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, dim) * 0.02)  # [M, D]
        self.positions = feature_positions(num_features, dim)  # [N, D]
        self.feature_proj = nn.Sequential(nn.Linear(vision_dim, dim), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(layer_class(dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, lm_dim)

    def forward(self, features: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        features = self.feature_proj(features) + self.positions  # [B, N, D]
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, M, D]
        key_mask = None
        if views is not None:  # [B, V] -> [B, N]: each view's N / V features share its flag
            key_mask = views.to(features.device).repeat_interleave(features.shape[1] // views.shape[1], dim=1)
        for layer in self.layers:
            queries = layer(queries, features, key_mask)
        return self.out_proj(self.out_norm(queries))  # [B, M, Dl]


def merge_cells(features: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Pixel shuffle: `[B, V*H*W, C]` (V views of an `[H, W]` map, row by row) -> `[B, V*(H/k)*(W/k), k*k*C]`,
    each k x k block of cells one feature (its cells' channels side by side)."""
    rows, columns = grid
    batch, length, width = features.shape
    blocks = features.view(batch, length // (rows * columns), rows // k, k, columns // k, k, width)
    return blocks.permute(0, 1, 2, 4, 3, 5, 6).reshape(batch, -1, k * k * width)


def cell_coordinates(grid: tuple[int, int], views: int) -> torch.Tensor:
    """x and y of each cell's centre in [-1, 1], `[V*H*W, 2]`, row by row, the same for each of `views` views."""
    rows, columns = grid
    y = torch.linspace(-1, 1, rows) if rows > 1 else torch.zeros(1)
    x = torch.linspace(-1, 1, columns) if columns > 1 else torch.zeros(1)
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(-1, 2).repeat(views, 1)


class PerFeature(nn.Module):
    """Maps each feature `[B, N, Dv]` to a token `[B, M, Dl]` on its own (LLaVA); with `positioned`, each
    feature gets its learned position first (a convolutional tower's), else it goes in as it is (a ViT's).
    On a convnet's `grid`, `merge` k: M = N / k^2 (merge_cells); `coords`: x, y appended (cell_coordinates)."""

    def __init__(self, make_projection, num_features: int, vision_dim: int, positioned: bool,
                 grid: tuple[int, int] | None = None, merge: int = 1, coords: bool = False):
        super().__init__()
        if (merge > 1 or coords) and grid is None:
            raise ConfigError("connector.merge and connector.coords work on a convolutional tower's map "
                              "(vision.family=resnet or a convnet checkpoint); this tower's tokens have no grid")
        if merge > 1 and (grid[0] % merge or grid[1] % merge):
            raise ConfigError(f"connector.merge={merge} does not divide the tower's {grid[0]} x {grid[1]} map")
        self.grid, self.merge = grid, merge
        self.positions = feature_positions(num_features, vision_dim) if positioned else None  # [N, Dv]
        merged_grid = (grid[0] // merge, grid[1] // merge) if grid else None
        views = num_features // (grid[0] * grid[1]) if grid else 1
        # [M, 2], not saved: rebuilt from the grid; None without coords
        self.register_buffer("coords", cell_coordinates(merged_grid, views) if coords else None, persistent=False)
        self.projection = make_projection(merge * merge * vision_dim + (2 if coords else 0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            features = features + self.positions
        if self.merge > 1:
            features = merge_cells(features, self.grid, self.merge)
        if self.coords is not None:
            features = torch.cat([features, self.coords.to(features.dtype).expand(features.shape[0], -1, -1)], -1)
        return self.projection(features)


def _qformer(cfg, vision_dim, lm_dim, num_features, positioned, grid=None):
    return QueryResampler(QFormerLayer, cfg, vision_dim, lm_dim, num_features)


def _perceiver(cfg, vision_dim, lm_dim, num_features, positioned, grid=None):
    return QueryResampler(PerceiverLayer, cfg, vision_dim, lm_dim, num_features)


def _mlp(cfg, vision_dim, lm_dim, num_features, positioned, grid):
    def mlp(width):
        return nn.Sequential(nn.Linear(width, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    return PerFeature(mlp, num_features, vision_dim, positioned, grid, cfg.merge, cfg.coords)


def _linear(cfg, vision_dim, lm_dim, num_features, positioned, grid):
    return PerFeature(lambda width: nn.Linear(width, lm_dim), num_features, vision_dim, positioned, grid,
                      cfg.merge, cfg.coords)


def _pretrained_qformer(cfg, vision_dim, lm_dim, num_features, positioned, grid=None):
    positions = feature_positions(num_features, vision_dim) if positioned else None  # [N, Dv]: a convnet's
    return build_qformer_connector(cfg, vision_dim, lm_dim, positions)


CONNECTORS = {"qformer": _qformer, "perceiver": _perceiver, "mlp": _mlp, "linear": _linear,
              "blip2": _pretrained_qformer, "instructblip": _pretrained_qformer}


PER_FEATURE = ("mlp", "linear")  # the kinds connector.merge and connector.coords apply to


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_features: int,
                    positioned: bool = False, grid: tuple[int, int] | None = None) -> nn.Module:
    """A connector for `num_features` vision features of width `vision_dim`, emitting tokens of width `lm_dim`;
    `positioned`: the features carry no position of their own (a convolutional map, `VisionTower.feature_layout`);
    `grid`: that map's (H, W) (num_features is a multiple of H * W: one map per view), for merge and coords."""
    builder = lookup(CONNECTORS, cfg.kind, "connector")
    if cfg.init and cfg.kind not in BY_CONNECTOR:
        raise ConfigError(f"connector.init={cfg.init!r} loads a transformers Q-Former: set connector.kind to one of "
                          f"{', '.join(BY_CONNECTOR)} (connector.kind={cfg.kind!r} is vlmlab's own)")
    if (cfg.merge != 1 or cfg.coords) and cfg.kind not in PER_FEATURE:
        raise ConfigError(f"connector.merge and connector.coords apply to connector.kind={' | '.join(PER_FEATURE)}, "
                          f"not {cfg.kind!r}")
    if cfg.merge < 1:
        raise ConfigError(f"connector.merge={cfg.merge} must be at least 1 (1: one token per cell)")
    return builder(cfg, vision_dim, lm_dim, num_features, positioned, grid)
