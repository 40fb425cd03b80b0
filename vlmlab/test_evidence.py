"""The evidence behind an answer on tiny real models: the answer is `ask`'s, its probability is the LM's own loss,
the heatmap lies on the tower's grid, peaks where the visual-token weights are planted, follows the image; and
`vlmlab ask --explain`."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab import evidence as ev
from vlmlab.cli import main
from vlmlab.config import DataConfig
from vlmlab.data.synthetic import make_split
from vlmlab.evidence import explain, overlay
from vlmlab.model import build_vlm
from vlmlab.prompts import format_prompt, training_texts
from vlmlab.test_model import small

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def examples():
    """One example per distinct image (a synthetic image comes with a caption and questions)."""
    return list({e.image_id: e for e in make_split("train", 4, questions_per_image=1)}.values())


def fresh(examples, preset, *overrides):
    torch.manual_seed(0)
    return build_vlm(small(preset, "eval.max_new_tokens=4", *overrides), training_texts(examples, DataConfig())).eval()


@pytest.fixture(scope="module")
def convnet(examples):  # tiny ResNet -> mlp -> tiny T5: one visual token per cell
    return fresh(examples, "default")


@pytest.fixture(scope="module")
def qformer(examples):  # tiny CLIP ViT (64 px, patch 8: CLS + 8 x 8) -> Q-Former -> tiny T5
    return fresh(examples, "tiny-qformer")


def check_evidence(model, examples, question=QUESTION, method=ev.DEFAULT_METHOD):
    image = examples[0].image
    found = explain(model, image, question, other=examples[1].image, method=method)
    expected = model.caption(image) if question is None else model.ask(image, question)
    assert found.answer == expected
    lm = model.language
    assert lm.tokenizer.decode(found.token_ids, skip_special_tokens=True).strip() == found.answer
    assert 0 < found.probability <= 1 and 0 < found.probability_blank <= 1
    # Independently: the LM's summed answer loss of the same ids with the same visual tokens.
    with torch.no_grad():
        visual = model.visual_tokens(model.pixels_of([image]))
        prompt = lm.encode_prompts([format_prompt(model.config.data, question)])
        loss = float(lm.answer_losses(visual, prompt, [found.token_ids])[0])
    assert found.probability == pytest.approx(math.exp(-loss), rel=1e-4)
    assert found.heatmap.shape == found.grid and np.isfinite(found.heatmap).all()
    assert found.heatmap.min() >= 0 and found.heatmap.max() <= 1
    assert isinstance(found.answer_blank, str) and isinstance(found.answer_other, str)
    return found


@pytest.mark.parametrize("method", list(ev.METHODS))
def test_convnet_mlp_heatmap_is_the_feature_grid(convnet, examples, method):
    found = check_evidence(convnet, examples, method=method)
    assert found.grid == convnet.vision.feature_layout()[2]


@pytest.mark.parametrize("method", list(ev.METHODS))
def test_qformer_on_a_vit_maps_to_the_patch_grid(qformer, examples, method):
    found = check_evidence(qformer, examples, method=method)
    side = qformer.config.vision.image_size // qformer.config.vision.patch_size
    assert found.grid == (side, side)
    assert explain(qformer, examples[0].image, QUESTION).answer_other is None


@pytest.mark.parametrize("overrides", [(), ("language.fusion=cross_attention",),
                                       ("connector.kind=perceiver", "data.image_split=true")])
def test_decoder_only_layouts(examples, overrides):
    model = fresh(examples, "tiny-gpt2", *overrides)
    check_evidence(model, examples)
    check_evidence(model, examples, question=None)  # a caption


def plant_lm_weights(monkeypatch, token: int):
    """The LM's weights over the visual tokens forced to one token; the probability stays the real one."""
    real = ev._lm_pass

    def planted(lm, visual, prompt, answer, attention):
        nll, weights = real(lm, visual, prompt, answer, attention)
        if weights is None:
            return nll, None
        return nll, torch.nn.functional.one_hot(torch.tensor(token), visual.shape[1]).float()

    monkeypatch.setattr(ev, "_lm_pass", planted)


def test_planted_visual_token_peaks_at_its_cell(convnet, examples, monkeypatch):
    rows, columns = convnet.vision.feature_layout()[2]
    cell = (3, 5)
    plant_lm_weights(monkeypatch, cell[0] * columns + cell[1])
    heatmap = explain(convnet, examples[0].image, QUESTION, method="attention").heatmap
    assert np.unravel_index(heatmap.argmax(), heatmap.shape) == cell and heatmap[cell] == 1
    assert (heatmap == 0).sum() == rows * columns - 1


def test_planted_merged_token_lights_its_block_of_cells(examples, monkeypatch):
    merged = fresh(examples, "default", "connector.merge=2")
    rows, columns = merged.vision.feature_layout()[2]
    plant_lm_weights(monkeypatch, 1 * (columns // 2) + 2)  # merged token (1, 2): cells rows 2-3, columns 4-5
    heatmap = explain(merged, examples[0].image, QUESTION, method="attention").heatmap
    lit = np.zeros((rows, columns), dtype=bool)
    lit[2:4, 4:6] = True
    assert (heatmap[lit] == 1).all() and (heatmap[~lit] == 0).all()


def test_planted_query_attention_peaks_at_its_patch(qformer, examples, monkeypatch):
    plant_lm_weights(monkeypatch, 0)  # the LM reads query 0 only
    attention = qformer.connector.layers[0].cross_attention
    real = attention.weights

    def weights(x, context, key_mask=None):  # query 0 reads patch (2, 6), i.e. feature 1 + 2 * 8 + 6 after CLS
        w = torch.zeros_like(real(x, context, key_mask))
        w[:, :, 0, 1 + 2 * 8 + 6] = 1.0
        w[:, :, 1:, 0] = 1.0  # the other queries read only CLS, which the LM ignores here
        return w

    monkeypatch.setattr(attention, "weights", weights)
    heatmap = explain(qformer, examples[0].image, QUESTION, method="attention").heatmap
    assert np.unravel_index(heatmap.argmax(), heatmap.shape) == (2, 6)


def test_another_image_gives_another_heatmap(convnet, qformer, examples):
    for model in (convnet, qformer):
        for method in ev.METHODS:
            first = explain(model, examples[0].image, QUESTION, method=method).heatmap
            second = explain(model, examples[1].image, QUESTION, method=method).heatmap
            assert not np.allclose(first, second)


def grey_with_block(model, grid, corner, cells=2):
    """A grey image but for a red block of `cells` x `cells` grid cells at `corner` (grey stays the median)."""
    side = model.vision.image_size
    pixels = np.full((side, side, 3), 128, np.uint8)
    top, _, left, _ = ev.cell_box(corner, grid, side)
    _, bottom, _, right = ev.cell_box((corner[0] + cells - 1, corner[1] + cells - 1), grid, side)
    pixels[top:bottom, left:right] = (220, 40, 40)
    block = np.zeros(grid, bool)
    block[corner[0]:corner[0] + cells, corner[1]:corner[1] + cells] = True
    return Image.fromarray(pixels), block


@pytest.mark.parametrize("corner", [(1, 2), (9, 12)])
def test_occlusion_peaks_where_the_pixels_changed(convnet, corner):
    """Blanking a cell that already holds the background changes nothing, so only the red block's cells can
    move the answer: the map is 0 elsewhere and peaks inside the block, wherever the block is."""
    grid = convnet.vision.feature_layout()[2]
    image, block = grey_with_block(convnet, grid, corner)
    found = explain(convnet, image, QUESTION, method="occlusion")
    assert found.heatmap.shape == grid
    assert block[np.unravel_index(found.heatmap.argmax(), grid)] and found.heatmap.max() == 1
    assert found.heatmap[~block].max() < 1e-3


def test_occlusion_drops_are_the_answer_losses(qformer, monkeypatch):
    """The raw per-cell drop is log p(answer | image) - log p(answer | cell blanked), on a ViT and Q-Former too:
    0 where the blanked cell was already grey, the LM's own loss difference for a cell of the block."""
    grid = (8, 8)
    image, block = grey_with_block(qformer, grid, (3, 5))
    raw = {}
    real = ev.METHODS["occlusion"]

    def kept(model, seen, *args):
        raw["drop"], raw["seen"] = real(model, seen, *args), seen
        return raw["drop"]

    monkeypatch.setitem(ev.METHODS, "occlusion", kept)
    explain(qformer, image, QUESTION, method="occlusion")
    assert raw["drop"].shape == grid and np.abs(raw["drop"][~block]).max() < 1e-4
    seen, lm = raw["seen"], qformer.language
    occluded = ev._occluded(qformer, seen, grid, [(3, 5)])
    assert (occluded[0] != seen.pixels[0]).any(dim=0).sum() == 8 * 8  # one 8 x 8 px patch, all three channels
    with torch.no_grad():
        loss = float(lm.answer_losses(qformer.visual_tokens(occluded), [seen.prompt], [seen.answer])[0])
    assert raw["drop"][3, 5] == pytest.approx(max(loss - seen.nll, 0.0), abs=1e-4)


def test_unknown_method_is_refused(convnet, examples):
    with pytest.raises(ValueError, match="occlusion"):
        explain(convnet, examples[0].image, QUESTION, method="gradcam")


def test_overlay_is_the_image_size(convnet, examples):
    found = explain(convnet, examples[0].image, QUESTION)
    picture = overlay(found.seen, found.heatmap)
    assert picture.size == found.seen.size and picture.mode == "RGB"
    wide = overlay(Image.new("RGB", (40, 20), (128, 128, 128)), found.heatmap, alpha=1.0)
    assert wide.size == (40, 40)


def test_ask_explain_cli(convnet, examples, tmp_path, capsys):
    convnet.save(tmp_path / "model")
    image = tmp_path / "img.png"
    examples[0].image.save(image)
    capsys.readouterr()
    assert main(["ask", "--model", str(tmp_path / "model"), str(image), QUESTION]) == 0
    plain = capsys.readouterr().out
    assert plain.count("\n") == 1 and plain.strip() == convnet.ask(image, QUESTION)
    out = tmp_path / "why.png"
    assert main(["ask", "--model", str(tmp_path / "model"), str(image), QUESTION, "--explain", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == plain.strip() and len(lines) == 2
    assert "p(answer | image)" in lines[1] and "blank" in lines[1]
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.size == (convnet.vision.image_size,) * 2
    assert "occlusion heatmap" in lines[1]
    for method in ev.METHODS:  # the CLI offers every method
        assert main(["ask", "--model", str(tmp_path / "model"), str(image), QUESTION, "--explain", str(out),
                     "--explain-method", method]) == 0
        assert f"{method} heatmap" in capsys.readouterr().out
