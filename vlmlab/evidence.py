"""The evidence behind one answer: what the model said, how sure it was with and without the image, and where in
the image the answer drew on.

`explain(model, image, question)` generates the answer as `VLM.ask` / `VLM.caption` do, keeps its raw ids (so an
EOS-first answer is visible), then teacher-forces [prompt; answer] once with attention weights on and maps them
back to the tower's grid in three steps:

1. LM side -> weights over the M visual tokens `[M]`: the attention each position that predicts an answer token
   gives the visual tokens, averaged over layers, heads and answer tokens. Where it is read:
   a prefix decoder-only LM's self-attention over the prefix positions; an encoder-decoder (T5)'s decoder
   cross-attention over the encoder positions holding visual tokens; with gated cross-attention fusion the fused
   blocks' attention (their `Attention.weights`, read by a forward hook; the blocks' outputs are untouched).
2. connector -> weights over the N tower features `[N]`: a Q-Former / perceiver (`QueryResampler`) maps its
   queries to features with its query->feature cross-attention `A [M, N]` (averaged over layers and heads;
   a perceiver's latent->latent share is dropped): weights_N = weights_M @ A. An MLP / linear connector
   (`PerFeature`) makes token i from feature i: weights_N = weights_M (with `connector.merge` k, token i from a
   k x k block of cells, its weight shared by them). Any other connector: the features get
   even weights (a flat map) and a warning says so, rather than a guess.
3. features -> grid `[H, W]`: a convnet's map comes from `vision.feature_layout()`; a ViT's N is (S/patch)^2,
   after dropping a leading CLS token when it has one (CLIP has, SigLIP has not). With image splitting the
   features of the 4 crops and the whole image are concatenated; the heatmap is the whole-image view's (the last
   N features), the one that lines up with the image as a whole.

That is `method="attention"`. `method="occlusion"` (the default) asks the model instead: each cell of the same
grid is blanked in the image, in turn (its pixels set to the image's background: its per-channel median colour),
and the heatmap is how much the answer's log-probability drops, clipped at 0. It needs no attention, so it works the
same through any tower, connector or LM (a Q-Former too); its cost is one forward of the whole model per cell,
run `OCCLUSION_BATCH` cells at a time (256 cells for the offline default's 16 x 16 grid). With image splitting the
cell is blanked in the original image, as the same share of it, so every view loses it (exact with
`data.image_resize=squash`, the default). `METHODS` names them both; `benchmarks/evidence_on_object.py` measures
how often each lies on the object a question names.

The map is min-max normalised to [0, 1] (a flat map, where every cell got the same, is all ones).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmlab.connectors import (
    Attention,
    PerceiverLayer,
    PerFeature,
    QFormerLayer,
    QueryResampler,
)
from vlmlab.diagnose import blank_example, eager_attention
from vlmlab.images import load_image
from vlmlab.log import warn
from vlmlab.prompts import format_prompt


@dataclass
class Evidence:
    answer: str  # the generated text (greedy/beam per options)
    token_ids: list[int]  # the raw generated ids (EOS included if generated)
    answer_blank: str  # the answer with the image replaced by a blank (grey) image
    answer_other: str | None  # the answer with the image swapped for `other`; None without one
    probability: float  # p(answer tokens | image, prompt) under teacher forcing
    probability_blank: float  # the same answer's probability with the blank image
    heatmap: np.ndarray  # [H, W] in [0, 1] over the tower's patch or cell grid
    grid: tuple[int, int]  # (H, W) of that grid
    seen: Image.Image | None = field(default=None, repr=False)  # the (whole-image) view as the tower saw it


# ---------------------------------------------------------------------------------------------------- reading


@contextmanager
def _recording(attentions: list[Attention]):
    """Forward hooks that keep each module's attention probabilities `[B, H, Q, K]` in a list per module."""
    kept: list[list[torch.Tensor]] = [[] for _ in attentions]
    handles = [
        module.register_forward_hook(lambda m, args, out, i=i: kept[i].append(m.weights(*args)))
        for i, module in enumerate(attentions)
    ]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def _connector_attentions(connector) -> list[tuple[Attention, bool]]:
    """(the query->feature attention of each layer, whether its keys are [features; latents] (a perceiver))."""
    if not isinstance(connector, QueryResampler):
        return []
    found = []
    for layer in connector.layers:
        if isinstance(layer, QFormerLayer):
            found.append((layer.cross_attention, False))
        elif isinstance(layer, PerceiverLayer):
            found.append((layer.attention, True))
    return found


def _token_ids(lm, ids: torch.Tensor) -> list[int]:
    """One generated row -> its raw ids: an encoder-decoder's start token dropped, and nothing after the first
    EOS (padding only)."""
    row = ids[0].tolist()
    if lm.is_encoder_decoder and row:
        row = row[1:]
    if lm.eos_id in row:
        row = row[: row.index(lm.eos_id) + 1]
    return row


def _lm_pass(lm, visual: torch.Tensor, prompt: list[int], answer: list[int], attention: bool):
    """Teacher-forces [prompt; answer] once: (summed NLL of the answer tokens, LM weights over the M visual tokens
    `[M]` or None). The NLL counts every token once (no `eos_loss_weight`): it is a probability, not a loss."""
    num_visual = visual.shape[1]
    fusion = lm.fusion
    hooks = [block.attention for block in fusion.blocks] if attention and fusion is not None else []
    looking = eager_attention(lm.model) if attention and fusion is None else _nothing()
    with torch.no_grad(), looking, _recording(hooks) as fused:
        output = lm(visual, [prompt], [answer], output_attentions=attention and fusion is None)
    logits = output.logits[0].float()  # [T, V]
    predicting = _predicting(lm, logits.shape[0], len(answer))
    targets = torch.tensor(answer, device=logits.device)
    nll = float(F.cross_entropy(logits[predicting], targets, reduction="sum"))
    if not attention:
        return nll, None
    if fusion is not None:  # each block: [1, H, T_text, M]; the text row is [prompt; answer]
        layers = [kept[-1][0, :, predicting] for kept in fused]
    elif lm.is_encoder_decoder:  # [1, H, T_dec, L_enc]; the encoder reads [visual; prompt]
        layers = [a[0, :, predicting, :num_visual] for a in output.cross_attentions]
    else:  # [1, H, L, L] over [visual; prompt; answer]
        layers = [a[0, :, predicting, :num_visual] for a in output.attentions]
    return nll, torch.stack(layers).float().mean(dim=(0, 1, 2)).cpu()  # [M]


def _predicting(lm, length: int, count: int) -> torch.Tensor:
    """The positions of a teacher-forced row of `length` whose logits predict its `count` answer tokens."""
    if lm.is_encoder_decoder:
        return torch.arange(count)  # decoder position t predicts answer token t
    return torch.arange(length - count - 1, length - 1)  # no padding: position t predicts token t + 1


def _answer_nlls(lm, visual: torch.Tensor, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The summed NLL of the same answer after the same prompt under each row of `visual` `[B, M, D]`: `[B]`
    (rows of equal length, so no padding; every token counted once, as `_lm_pass`)."""
    rows = visual.shape[0]
    with torch.no_grad():
        logits = lm(visual, [prompt] * rows, [answer] * rows).logits.float()  # [B, T, V]
    predicting = _predicting(lm, logits.shape[1], len(answer)).to(logits.device)
    targets = torch.tensor(answer, device=logits.device).expand(rows, -1)
    return F.cross_entropy(logits[:, predicting].transpose(1, 2), targets, reduction="none").sum(dim=1).cpu()


@contextmanager
def _nothing():
    yield


def _feature_grid(model) -> tuple[int, tuple[int, int], bool]:
    """(N features per view, (H, W), whether a CLS token leads the N) of the tower's features."""
    per_view, _, grid = model.vision.feature_layout()
    if grid is not None:
        return per_view, grid, False
    side = math.isqrt(per_view)
    if side * side == per_view:
        return per_view, (side, side), False
    side = math.isqrt(per_view - 1)
    if side * side == per_view - 1:
        return per_view, (side, side), True
    warn(f"evidence: {per_view} ViT features make no square grid; the heatmap is one row of them")
    return per_view, (1, per_view), False


def _feature_weights(model, lm_weights: torch.Tensor, connector_maps: list, num_total: int) -> torch.Tensor:
    """LM weights over M visual tokens `[M]` -> weights over the connector's N input features `[N]`."""
    connector = model.connector
    if connector_maps:  # [M, N]: the queries' attention on the features, averaged over layers and heads
        return lm_weights @ torch.stack(connector_maps).mean(0)
    per_feature = isinstance(connector, PerFeature)
    if per_feature and connector.merge > 1:  # token i is a k x k block of cells: its weight spread over them
        (rows, columns), k = connector.grid, connector.merge
        blocks = lm_weights.view(-1, rows // k, columns // k) / (k * k)  # [V, H/k, W/k]
        return blocks.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).reshape(-1)  # [V * H * W]
    if per_feature or (lm_weights.shape[0] == num_total and not isinstance(connector, QueryResampler)):
        return lm_weights  # token i is feature i (an unknown connector with M == N is read the same way)
    warn(f"evidence: the {type(connector).__name__} connector's attention cannot be read; the heatmap is flat")
    return torch.ones(num_total)


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high) or high - low < 1e-12:
        return np.ones_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- methods


OCCLUSION_BATCH = 64  # occluded images per forward


@dataclass
class _Seen:
    """What a heatmap method may read about one explained answer."""

    image: object  # the image as given (a path or PIL image)
    pixels: torch.Tensor  # [1, 3, S, S] or [1, V, 3, S, S] uint8
    prompt: list[int]
    answer: list[int]  # the generated ids
    nll: float  # the answer's NLL with the image as it is
    lm_weights: torch.Tensor | None  # the LM's attention over the M visual tokens `[M]` (attention only)
    connector_maps: list  # the connector's query->feature attention `[M, N]` per layer
    features: int  # N, the tower's features over all views


def _attention_map(model, seen: _Seen, grid: tuple[int, int], per_view: int, has_cls: bool) -> np.ndarray:
    """The answer's attention on the visual tokens, mapped back to the tower's grid (module doc, steps 1-3)."""
    weights = _feature_weights(model, seen.lm_weights, seen.connector_maps, seen.features)[-per_view:]
    if has_cls:
        weights = weights[1:]
    return weights.reshape(grid).numpy().astype(np.float64)


def cell_box(cell: tuple[int, int], grid: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds, end exclusive, of `cell` of a `grid` over a `side` x `side` view."""
    (row, column), (rows, columns) = cell, grid
    return (round(row * side / rows), round((row + 1) * side / rows),
            round(column * side / columns), round((column + 1) * side / columns))


def _background(view: torch.Tensor) -> torch.Tensor:
    """The colour a blanked cell gets: the per-channel median of the view `[3, S, S]` (uint8 `[3]`), i.e. the
    background where most of the picture is background. A fixed grey (the tower's mean) would paint a grey square
    on a white scene, a new object the answer reacts to wherever it is put: on world v1 the peak then lies on the
    named object for 0.48 of the questions, against 0.75 with the median (benchmarks/evidence_on_object.py)."""
    return view.flatten(1).median(dim=1).values


def _occluded(model, seen: _Seen, grid: tuple[int, int], cells: list[tuple[int, int]]) -> torch.Tensor:
    """Pixels of the image with each of `cells` blanked to the image's background, one image per cell."""
    if seen.pixels.ndim == 4:  # one view: blank the cell in the view the tower sees
        fill = _background(seen.pixels[0])
        batch = seen.pixels.repeat(len(cells), 1, 1, 1)
        side = batch.shape[-1]
        for k, cell in enumerate(cells):
            top, bottom, left, right = cell_box(cell, grid, side)
            batch[k, :, top:bottom, left:right] = fill[:, None, None]
        return batch
    # Image splitting: the cell's share of the original image, so that the crops lose it too.
    from PIL import ImageDraw

    picture = (seen.image if isinstance(seen.image, Image.Image) else load_image(Path(seen.image))).convert("RGB")
    fill = _background(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    (rows, columns), (width, height) = grid, picture.size
    images = []
    for row, column in cells:
        copy = picture.copy()
        box = (round(column * width / columns), round(row * height / rows),
               round((column + 1) * width / columns) - 1, round((row + 1) * height / rows) - 1)
        ImageDraw.Draw(copy).rectangle(box, fill=tuple(int(v) for v in fill))
        images.append(copy)
    return model.pixels_of(images)


def _occlusion_map(model, seen: _Seen, grid: tuple[int, int], per_view: int, has_cls: bool) -> np.ndarray:
    """Per cell: the drop in the answer's log-probability when that cell of the image is blanked, clipped at 0."""
    cells = [(row, column) for row in range(grid[0]) for column in range(grid[1])]
    nlls = []
    for start in range(0, len(cells), OCCLUSION_BATCH):
        pixels = _occluded(model, seen, grid, cells[start:start + OCCLUSION_BATCH])
        with torch.no_grad():
            visual = model.visual_tokens(pixels)
        nlls.append(_answer_nlls(model.language, visual, seen.prompt, seen.answer))
    drop = torch.cat(nlls).double().numpy() - seen.nll  # log p(answer | image) - log p(answer | occluded)
    return np.clip(drop, 0.0, None).reshape(grid)


# name -> heatmap over the tower's grid (before normalising); `explain(method=...)`, `vlmlab ask --explain-method`
METHODS = {"occlusion": _occlusion_map, "attention": _attention_map}
DEFAULT_METHOD = "occlusion"


# ---------------------------------------------------------------------------------------------------- explain


def explain(model, image, question: str | None, other=None, max_new_tokens: int | None = None,
            min_new_tokens: int | None = None, num_beams: int | None = None,
            method: str = DEFAULT_METHOD) -> Evidence:
    """The answer to `question` about `image` (None: its caption) and the evidence behind it, its heatmap made by
    `method` (a name in `METHODS`; module doc)."""
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}; choose one of {', '.join(METHODS)}")
    lm = model.language
    caption = question is None
    if caption:
        prompt_text = format_prompt(model.config.data, None)
    else:
        if not question.strip():
            raise ValueError("the question is empty; ask something about the image")
        fitted = lm.fit_question(question, lambda text: format_prompt(model.config.data, text))
        if fitted != question:
            warn(f"question cut to its first {len(fitted)} of {len(question)} characters to fit "
                 f"language.max_prompt_tokens={lm.max_prompt_tokens}")
        prompt_text = format_prompt(model.config.data, fitted)
    options = model._generation_options(caption=caption)
    for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens),
                        ("num_beams", num_beams)):
        if value is not None:
            options[name] = value
    prompt = lm.encode_prompts([prompt_text])[0]
    was_training = model.training
    model.eval()
    try:
        pixels = model.pixels_of([image])  # [1, 3, S, S] or [1, V, 3, S, S]
        hooked = _connector_attentions(model.connector)
        with torch.no_grad(), _recording([module for module, _ in hooked]) as kept:
            tower = model.vision(pixels.to(model.device))  # [1, N, Dv], N over all views
            visual = model.visual_tokens(None, tower)  # [1, M, D]
        features = tower.shape[1]
        connector_maps = []
        for (module, perceiver), weights in zip(hooked, kept):
            a = weights[-1][0].float().mean(0)  # [M, N] (a perceiver's [M, N + M])
            connector_maps.append(a[:, :features].cpu())
        ids = _token_ids(lm, lm.generate_ids(visual, [prompt], **options))
        answer = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        nll, lm_weights = _lm_pass(lm, visual, prompt, ids, attention=method == "attention")

        def answer_with(picture) -> tuple[str, torch.Tensor]:
            with torch.no_grad():
                seen = model.visual_tokens(model.pixels_of([picture]))
            return lm.generate(seen, [prompt], **options)[0], seen

        blank = blank_example().image
        answer_blank, blank_visual = answer_with(blank)
        nll_blank, _ = _lm_pass(lm, blank_visual, prompt, ids, attention=False)
        answer_other = answer_with(other)[0] if other is not None else None

        per_view, grid, has_cls = _feature_grid(model)  # the whole view's grid
        seen_by = _Seen(image=image, pixels=pixels, prompt=prompt, answer=ids, nll=nll, lm_weights=lm_weights,
                        connector_maps=connector_maps, features=features)
        heatmap = _normalise(METHODS[method](model, seen_by, tuple(grid), per_view, has_cls))
        view = pixels[0, -1] if pixels.ndim == 5 else pixels[0]  # [3, S, S] uint8
        seen = Image.fromarray(view.permute(1, 2, 0).cpu().numpy())
    finally:
        model.train(was_training)
    return Evidence(answer=answer, token_ids=ids, answer_blank=answer_blank, answer_other=answer_other,
                    probability=math.exp(-nll), probability_blank=math.exp(-nll_blank), heatmap=heatmap,
                    grid=tuple(grid), seen=seen)


def overlay(image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """`heatmap` `[H, W]` upsampled onto the image and colour-mapped (matplotlib's jet), blended at `alpha`.

    Pass the image as the model saw it (`Evidence.seen`: after its resize, the whole-image view) for exact
    alignment; any other image (a path or PIL image) is squashed to a square first, as `data.image_resize=squash`
    (the default) shows it to the tower.
    """
    from matplotlib import colormaps

    picture = image if isinstance(image, Image.Image) else load_image(Path(image))
    picture = picture.convert("RGB")
    side = max(picture.size)
    if picture.width != picture.height:
        picture = picture.resize((side, side), Image.Resampling.BICUBIC)
    values = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    upsampled = Image.fromarray(np.uint8(np.rint(values * 255))).resize(picture.size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(upsampled, dtype=np.float32) / 255.0)[..., :3]  # [S, S, 3]
    heat = Image.fromarray(np.uint8(np.rint(coloured * 255)))
    return Image.blend(picture, heat, float(alpha))
