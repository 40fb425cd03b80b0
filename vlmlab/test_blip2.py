"""BLIP-2 and InstructBLIP checkpoints in vlmlab: tiny ones of the real transformers classes, saved with
`save_pretrained` (no network). vlmlab's answers equal transformers' own `generate` on the same images and
prompts (through the family's processor); a training step moves only what trains; save -> load gives the same
outputs; `connector.init` loads a Q-Former into a recipe whose tower is of another width, or starts from BERT."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing
from transformers import (
    BertConfig,
    BertModel,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    T5Config,
)

from vlmlab.blip2 import QFORMER_TOKENIZER, as_is_config
from vlmlab.cli import main
from vlmlab.config import Config, ConfigError, apply_overrides
from vlmlab.model import VLM, build_vlm
from vlmlab.prompts import format_prompt
from vlmlab.tokenizer import train_tokenizer

TEXT = ["what colour is the square", "how many circles are there", "red blue green two three", "a small shape"] * 8
QUESTIONS = ["what colour is the square?", "how many circles?"]
SIZE, QUERIES = 32, 4
GREEDY = {"max_new_tokens": 6, "min_new_tokens": 3, "num_beams": 1}  # random weights would stop at once


def _lm_tokenizer():
    """A T5-like tokenizer: its encoding ends with EOS, as Flan-T5's does; `<image>` added as transformers 5's
    BLIP-2 tokenizers have it."""
    tokenizer = train_tokenizer(TEXT, 200)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def _save(tmp_path, kind: str):
    torch.manual_seed(0)
    tokenizer = _lm_tokenizer()
    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=8)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   encoder_hidden_size=32)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    images = BlipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.48, 0.46, 0.41],
                                image_std=[0.27, 0.26, 0.28])
    folder = tmp_path / kind
    if kind == "blip2":
        config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                             num_query_tokens=QUERIES, image_token_index=image_token)
        model = Blip2ForConditionalGeneration(config)
        processor = Blip2Processor(images, tokenizer, num_query_tokens=QUERIES)
    else:
        qformer_tokenizer = train_tokenizer(TEXT, 150)
        config = InstructBlipConfig(vision_config=vision, qformer_config={**qformer, "vocab_size": len(qformer_tokenizer)},
                                    text_config=text, num_query_tokens=QUERIES, image_token_index=image_token)
        model = InstructBlipForConditionalGeneration(config)
        processor = InstructBlipProcessor(images, tokenizer, qformer_tokenizer, num_query_tokens=QUERIES)
        qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER)
    with torch.no_grad():  # transformers' init starts the queries at zero and a tiny T5 saying only <pad>:
        for weight in (model.query_tokens, *model.language_model.parameters()):  # outputs that prove nothing
            weight.normal_(std=0.5)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


@pytest.fixture(scope="module", params=["blip2", "instructblip"])
def checkpoint(request, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("checkpoints"), request.param)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in QUESTIONS]


def test_vlmlab_answers_equal_transformers_generate(checkpoint):
    folder, reference, processor = checkpoint
    model = VLM.load(str(folder), device="cpu")
    assert (model.config.vision.train, model.config.language.train) == ("frozen", "frozen")
    prompts = [format_prompt(model.config.data, q) for q in QUESTIONS]
    assert prompts[0] == "Question: what colour is the square? Short answer:"  # the family's prompt
    ours = model.generate(model.pixels_of(_images()), prompts, **GREEDY)
    inputs = processor(images=_images(), text=prompts, padding=True, return_tensors="pt")
    ids = reference.generate(**inputs, max_new_tokens=6, min_new_tokens=3, do_sample=False, num_beams=1)
    theirs = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert ours == theirs and all(ours)


def test_training_step_moves_only_what_trains_and_save_load_keeps_outputs(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    cfg = apply_overrides(as_is_config(str(folder)), ["language.train=lora", "connector.dropout=0"])
    model = build_vlm(cfg).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    prompts = [format_prompt(cfg.data, q) for q in QUESTIONS]
    model(model.pixels_of(_images()), prompts, ["red", "two"]).backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved, "nothing trained"
    assert all(name.startswith("connector.") or "lora_" in name for name in moved)
    assert any(name.startswith("connector.qformer.") for name in moved)
    assert any("lora_" in name for name in moved)
    assert not any(name.startswith("vision.") for name in moved)

    model.eval().save(tmp_path / "saved")
    again = VLM.load(tmp_path / "saved", device="cpu")
    pixels = model.pixels_of(_images())
    assert torch.equal(model.visual_tokens(pixels, prompts=prompts), again.visual_tokens(pixels, prompts=prompts))
    assert model.generate(pixels, prompts, **GREEDY) == again.generate(pixels, prompts, **GREEDY)


def test_init_loads_a_qformer_into_a_tower_of_another_width(checkpoint, capsys):
    folder, reference, _ = checkpoint
    kind = "instructblip" if "instruct" in folder.name else "blip2"
    # A tiny CLIP tower 48 wide (the checkpoint's is 32) -> its Q-Former -> a tiny T5 of another width
    cfg = apply_overrides(as_is_config(str(folder)), [
        "vision.model=", "vision.train=full", "vision.hidden_size=48", "vision.num_layers=1",
        "vision.image_size=32", "language.model=", "language.train=full", "language.hidden_size=24",
        "language.num_heads=2", "language.num_layers=1", f"connector.kind={kind}"])
    model = build_vlm(cfg, TEXT)
    said = capsys.readouterr().err
    # only what cannot fit: cross-attention key/value weights (tower 48 wide) and the projection (LM 24 wide)
    assert said.count("\n") == 1 and said.endswith(
        "tensors loaded; newly initialised: language_projection.bias, language_projection.weight, "
        "qformer.encoder.layer.*.crossattention.attention.key.weight, "
        "qformer.encoder.layer.*.crossattention.attention.value.weight\n")
    ours, theirs = model.connector.state_dict(), reference.state_dict()
    assert torch.equal(ours["query_tokens"], theirs["query_tokens"])
    key = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert ours[key].shape == (32, 48) and theirs[key].shape == (32, 32)
    for name in ("qformer.encoder.layer.1.attention.attention.query.weight",
                 "qformer.encoder.layer.0.crossattention.attention.query.weight",
                 "qformer.encoder.layer.0.output_query.dense.weight"):
        assert torch.equal(ours[name], theirs[name])
    with pytest.raises(ConfigError, match="connector.num_queries=4"):
        build_vlm(apply_overrides(cfg, ["connector.num_queries=8"]), TEXT)


def test_init_from_bert_copies_self_attention_and_feed_forward(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    cfg = apply_overrides(Config(), [
        "connector.kind=blip2", f"connector.init={tmp_path / 'bert'}", "connector.hidden_size=32",
        "connector.num_heads=2", "connector.num_layers=2", "vision.hidden_size=48", "vision.num_layers=1"])
    model = build_vlm(cfg, TEXT)
    state = model.connector.state_dict()
    assert torch.equal(state["qformer.encoder.layer.1.attention.attention.value.weight"],
                       bert.encoder.layer[1].attention.self.value.weight)
    assert torch.equal(state["qformer.encoder.layer.0.output_query.dense.weight"],
                       bert.encoder.layer[0].output.dense.weight)
    assert torch.equal(state["qformer.layernorm.weight"], bert.embeddings.LayerNorm.weight)


def test_a_vlmlab_qformer_refuses_init():
    cfg = apply_overrides(Config(), ["connector.init=somewhere"])
    with pytest.raises(ConfigError, match="set connector.kind to one of blip2, instructblip"):
        build_vlm(cfg, TEXT)


def test_cli_evaluates_a_checkpoint_with_its_prompt_decoding_and_the_shuffled_control(checkpoint, tmp_path, capsys):
    folder, _, _ = checkpoint
    lines = []
    for i, (image, question) in enumerate(zip(_images() * 2, ["what colour?", "how many?", "what shape?", "where?"])):
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": question, "answers": ["red"] * 10}))
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "eval.jsonl"), "--out", str(out),
                 "eval.caption_metrics=false"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_vqa_examples"] == 4 and "vqa_accuracy_shuffled_images" in metrics
    assert metrics["prompt"]["vqa"]["template"] == "Question: {question} Short answer:"
    assert metrics["decoding"] == {"max_new_tokens": 10, "caption_max_new_tokens": 32, "min_new_tokens": 1,
                                   "num_beams": 5, "do_sample": False}
    assert metrics["weights"]["language"]["resolved"].startswith("sha256:")  # which weights were evaluated
    capsys.readouterr()
    assert main(["ask", "--model", str(folder), str(tmp_path / "0.png"), "what colour?"]) == 0
    assert main(["caption", "--model", str(folder), str(tmp_path / "0.png")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["image"].endswith("0.png")
    assert main(["diagnose", "--model", str(folder), "--data", str(tmp_path / "eval.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] in ("uses_image", "ignores_image", "collapsed")


def test_every_part_can_be_adapted(checkpoint):
    folder, _, _ = checkpoint
    model = build_vlm(apply_overrides(as_is_config(str(folder)), ["vision.train=dora", "language.train=lora"]))
    for part in (model.vision, model.language):
        assert any("lora_" in name for name, p in part.named_parameters() if p.requires_grad)


def test_half_precision_bases_keep_the_trained_parts_in_fp32(checkpoint):
    folder, _, _ = checkpoint
    cfg = apply_overrides(as_is_config(str(folder), dtype="bf16"), ["language.train=lora"])
    model = build_vlm(cfg)
    assert model.vision.model.dtype == torch.bfloat16 and model.connector.query_tokens.dtype == torch.float32
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    prompts = [format_prompt(cfg.data, q) for q in QUESTIONS]
    model(model.pixels_of(_images()), prompts, ["red", "two"]).backward()
    assert all(p.grad is not None for p in model.connector.parameters())
    assert all(model.eval().generate(model.pixels_of(_images()), prompts, **GREEDY))
    with pytest.raises(ConfigError, match="language.dtype=bf16 with language.train=full"):
        build_vlm(apply_overrides(cfg, ["language.train=full"]))
