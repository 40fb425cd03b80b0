"""Every supported family loads by local path, the code path that takes hub names on Colab: tiny CLIP and SigLIP
dual encoders, T5, GPT-2 and a Llama-style LM (each with a tokenizer of its family's kind) are saved with
`save_pretrained`, then trained a few steps through vlmlab in each tuning mode, saved, loaded and asked again."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

from vlmlab import VLM
from vlmlab.cli import main
from vlmlab.config import Config, apply_overrides
from vlmlab.data.synthetic import make_split
from vlmlab.language import keep_fp32_modules
from vlmlab.model import build_vlm
from vlmlab.prompts import format_prompt
from vlmlab.tokenizer import train_tokenizer
from vlmlab.prompts import training_texts

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8)
TEXT_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)


def _texts() -> list[str]:
    return training_texts(make_split("train", 40, questions_per_image=3), Config().data)


def _t5(directory, texts):
    # A SentencePiece-style unigram vocabulary, as Flan-T5's tokenizer has: pad 0, EOS 1, UNK 2.
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _gpt2(directory, texts):
    # Byte-level BPE with EOS and no pad token, as GPT-2's: vlmlab reuses EOS for padding.
    bpe = train_tokenizer(texts, 300).backend_tokenizer
    tokenizer = GPT2Tokenizer(tokenizer_object=bpe, eos_token="</s>", bos_token="</s>", unk_token="<unk>")
    eos = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
                    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _llama(directory, texts):
    # Byte-level BPE in a generic fast tokenizer with BOS/EOS, as SmolLM2 ships it.
    bpe = train_tokenizer(["<s>", *texts], 300).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 tie_word_embeddings=True)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _clip(directory, texts):
    # The dual encoder, text tower included, as openai/clip-vit-* ships: vlmlab loads only its vision half.
    CLIPModel(CLIPConfig(vision_config=TOWER, text_config=TEXT_TOWER, projection_dim=16)).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(directory)


def _siglip(directory, texts):
    SiglipModel(SiglipConfig(vision_config=TOWER, text_config=TEXT_TOWER)).save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


BUILDERS = {"t5": _t5, "gpt2": _gpt2, "llama": _llama, "clip": _clip, "siglip": _siglip}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Each family saved once with `save_pretrained`, by name: {"t5": path, ...}."""
    texts = _texts()
    paths = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        paths[name] = tmp_path_factory.mktemp(name)
        build(paths[name], texts)
    return paths


def family_config(checkpoints, vision: str, language: str, *overrides: str) -> Config:
    return apply_overrides(Config(), [
        f"vision.model={checkpoints[vision]}", f"language.model={checkpoints[language]}", "vision.train=frozen",
        "connector.hidden_size=32", "connector.num_queries=4", "connector.num_layers=1", "connector.num_heads=2",
        "language.lora_rank=4", "language.lora_alpha=8", "language.lora_dropout=0.0", "vision.lora_rank=4",
        "vision.lora_alpha=8", "vision.lora_dropout=0.0", *overrides])


@pytest.fixture(scope="module")
def examples():
    return [e for e in make_split("train", 6, questions_per_image=2) if not e.is_caption]


def _batch(model, examples):
    pixels = model.pixels_of([e.image for e in examples])
    return pixels, [format_prompt(model.config.data, e.question) for e in examples], [e.target for e in examples]


def _train_steps(model, pixels, prompts, targets, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(pixels, prompts, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _bytes(directory) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@pytest.mark.parametrize("vision, language, vision_mode, language_mode", [
    ("clip", "t5", "frozen", "lora"),
    ("siglip", "t5", "frozen", "dora"),
    ("clip", "gpt2", "lora", "dora"),
    ("siglip", "gpt2", "frozen", "lora"),
    ("clip", "llama", "frozen", "lora"),
    ("siglip", "llama", "dora", "dora"),
])
def test_adapted_parts_save_small_and_reload_exactly(checkpoints, examples, tmp_path, vision, language,
                                                     vision_mode, language_mode):
    torch.manual_seed(0)
    # an adapted tower reads its first block's output: its second block is set aside, and gets no adapter
    second_last = ["vision.feature_layer=-2"] if vision_mode != "frozen" else []
    cfg = family_config(checkpoints, vision, language, f"vision.train={vision_mode}",
                        f"language.train={language_mode}", *second_last)
    model = build_vlm(cfg)
    pixels, prompts, targets = _batch(model, examples)
    adapters = {name: p.clone() for name, p in model.named_parameters() if "lora_B" in name}
    _train_steps(model, pixels, prompts, targets)
    assert all(not torch.equal(p, adapters[name]) for name, p in model.named_parameters() if "lora_B" in name)

    model.save(tmp_path / "model")
    saved = tmp_path / "model" / "language"
    assert sorted(path.name for path in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _bytes(saved) < _bytes(checkpoints[language]) / 3  # the adapter, not the base
    vision_files = sorted(path.name for path in (tmp_path / "model" / "vision").iterdir())
    assert vision_files == ([] if vision_mode == "frozen" else ["adapter_config.json", "adapter_model.safetensors"])
    if second_last:
        tower_adapter = load_file(tmp_path / "model" / "vision" / "adapter_model.safetensors")
        assert any(".layers.0." in key for key in tower_adapter)
        assert not any(".layers.1." in key for key in tower_adapter)
    if language_mode == "dora":
        assert any("lora_magnitude_vector" in key for key in load_file(saved / "adapter_model.safetensors"))

    loaded = VLM.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(pixels, prompts, targets), loaded(pixels, prompts, targets))
    assert model.generate(pixels, prompts, 6) == loaded.generate(pixels, prompts, 6)


def test_full_language_model_is_saved_in_full_and_reloads(checkpoints, examples, tmp_path):
    """The seed's baseline layout: a frozen tower kept by name, GPT-2 fine-tuned in full and saved in full."""
    torch.manual_seed(0)
    model = build_vlm(family_config(checkpoints, "clip", "gpt2", "language.train=full"))
    pixels, prompts, targets = _batch(model, examples)
    _train_steps(model, pixels, prompts, targets)
    model.save(tmp_path / "model")
    assert (tmp_path / "model" / "language" / "model.safetensors").is_file()
    assert not any((tmp_path / "model" / "vision").iterdir())
    loaded = VLM.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(pixels, prompts, targets), loaded(pixels, prompts, targets))


def test_train_ask_and_export_merged_through_the_command_line(checkpoints, tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    overrides = [f"{key}={value}" for key, value in (
        ("vision.model", checkpoints["clip"]), ("vision.train", "frozen"), ("language.model", checkpoints["t5"]),
        ("language.train", "lora"), ("language.lora_rank", 4), ("connector.hidden_size", 32),
        ("connector.num_queries", 4), ("connector.num_layers", 1), ("connector.num_heads", 2),
        ("data.train_images", 8), ("data.eval_images", 4), ("data.questions_per_image", 1), ("train.batch_size", 4),
        ("train.max_steps", 2), ("train.eval_every", 0), ("train.save_every", 0), ("train.warmup_steps", 1),
        ("train.lr", 0.01), ("train.gradient_checkpointing", "true"), ("eval.caption_metrics", "false"))]
    assert main(["train", "--out", str(run), *overrides]) == 0
    assert not (run / "model" / "language" / "model.safetensors").exists()
    image = tmp_path / "image.png"
    make_split("test", 1)[0].image.save(image)
    capsys.readouterr()
    assert main(["ask", "--model", str(run), str(image), "what color is the circle?"]) == 0
    answer = capsys.readouterr().out

    assert main(["export", "--model", str(run), "--out", str(merged), "--merge"]) == 0
    assert "adapters merged into language" in capsys.readouterr().out
    assert (merged / "language" / "model.safetensors").is_file()
    assert "lora" not in json.dumps(list(load_file(merged / "language" / "model.safetensors")))
    exported = VLM.load(merged, device="cpu")
    assert exported.config.language.train == "full"
    assert exported.ask(image, "what color is the circle?") == answer.strip()


def test_t5_feed_forward_output_stays_finite_under_fp16_autocast(checkpoints):
    """Flan-T5's `wo` activations exceed fp16's range; vlmlab runs those layers in fp32 under fp16 autocast."""
    model = T5ForConditionalGeneration.from_pretrained(checkpoints["t5"]).eval()
    with torch.no_grad():  # large activations into wo, weights well inside fp16's range: wo's outputs exceed 65504
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense.wi_1.weight.mul_(100)
            block.layer[-1].DenseReluDense.wo.weight.mul_(1000)
    ids = torch.arange(3, 11).unsqueeze(0)

    def encoder_output():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            return model.encoder(input_ids=ids).last_hidden_state

    assert not torch.isfinite(encoder_output()).all()  # what fp16 does to it unprotected
    keep_fp32_modules(model)
    with torch.no_grad():
        reference = model.encoder(input_ids=ids).last_hidden_state  # no autocast: fp32 throughout
    assert torch.isfinite(encoder_output()).all()
    assert torch.allclose(encoder_output().float(), reference, atol=0.05)
