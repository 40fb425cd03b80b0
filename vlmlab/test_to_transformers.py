"""`vlmlab export --format transformers`: a CLIP -> mlp -> Llama model loads in plain transformers as LLaVA and
gives vlmlab's logits and greedy text; other architectures are refused in one line."""

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmlab.cli import main
from vlmlab.config import DataConfig, apply_overrides
from vlmlab.data.synthetic import make_split
from vlmlab.model import build_vlm
from vlmlab.presets import get_preset
from vlmlab.prompts import format_prompt, training_texts
from vlmlab.test_model import SMALL
from vlmlab.to_transformers import IMAGE_TOKEN, export_llava

LLAVA = ["connector.kind=mlp", "language.family=llama", "vision.num_layers=2",
         "vision.feature_layer=-2"]


@pytest.fixture(scope="module")
def examples():
    return [e for e in make_split("train", 4, questions_per_image=1) if e.question]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def exported(request, examples, tmp_path_factory):
    torch.manual_seed(0)
    model = build_vlm(apply_overrides(get_preset("tiny-llama"), [*SMALL, *LLAVA, f"vision.family={request.param}"]),
                      training_texts(examples, DataConfig())).eval()
    folder = export_llava(model, tmp_path_factory.mktemp("llava"))
    return model, folder


def test_llava_gives_vlmlabs_logits_and_text(exported, examples):
    model, folder = exported
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    example = examples[0]
    prompt = format_prompt(model.config.data, example.question)
    pixels = model.pixels_of([example.image])
    ids = model.language.encode_prompts([prompt])[0]
    with torch.no_grad():
        visual = model.visual_tokens(pixels)  # [1, M, D]
        ours = model.language.model(**model.language._inputs(visual, [ids])).logits
        vision = model.vision
        pixel_values = (pixels.float() / 255.0 - vision.mean) / vision.std
        image_id = llava.config.image_token_id
        input_ids = torch.tensor([[image_id] * visual.shape[1] + ids])
        theirs = llava(input_ids=input_ids, pixel_values=pixel_values).logits
    vocab = ours.shape[-1]
    assert theirs.shape[-1] == vocab + 1  # the added <image> token
    assert torch.allclose(theirs[..., :vocab], ours, atol=1e-4), (theirs[..., :vocab] - ours).abs().max()
    assert (theirs[..., vocab:] < theirs[..., :vocab].max(-1, keepdim=True).values).all()

    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == image_id
    with torch.no_grad():
        new = llava.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False,
                             max_new_tokens=model.config.eval.max_new_tokens)[0, input_ids.shape[1]:]
    text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert text and text == model.ask(example.image, example.question)


def test_processor_builds_the_same_inputs(exported, examples):
    model, folder = exported
    processor = AutoProcessor.from_pretrained(folder)
    prompt = format_prompt(model.config.data, examples[0].question)
    inputs = processor(images=examples[0].image, text=IMAGE_TOKEN + prompt, return_tensors="pt")
    tokens = model.visual_tokens(model.pixels_of([examples[0].image])).shape[1]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == tokens
    assert inputs["pixel_values"].shape[-1] == model.vision.image_size


@pytest.mark.parametrize("overrides", [["connector.kind=qformer", "language.family=llama"], ["language.family=t5",
                                                                                              "connector.kind=mlp"]])
def test_other_architectures_need_vlmlab(overrides, examples, tmp_path, capsys):
    model = build_vlm(apply_overrides(get_preset("tiny-llama"), [*SMALL, *overrides]),
                      training_texts(examples, DataConfig()))
    model.save(tmp_path / "model")
    capsys.readouterr()
    code = main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                 "--format", "transformers"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs vlmlab to load" in err and len(err.splitlines()) == 1, err
