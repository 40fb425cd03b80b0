"""A language model read from a GGUF file (`language.gguf_file`), as SmolLM2 ships in llama.cpp's format: a tiny
Llama saved with `save_pretrained` is written out as GGUF by the `gguf` package, then loaded through vlmlab by
path, trained with LoRA or in full, saved and loaded again."""

import json

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmlab import VLM
from vlmlab.config import Config, ConfigError, apply_overrides
from vlmlab.language import build_language
from vlmlab.loading import CheckpointError
from vlmlab.model import build_vlm
from vlmlab.test_families import _batch, _train_steps, checkpoints, examples, family_config  # noqa: F401

gguf = pytest.importorskip("gguf")

GGUF_FILE = "tiny-llama.f32.gguf"
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def _rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """q / k rows in llama.cpp's order (each head's rotary halves interleaved), the inverse of what transformers
    undoes when it reads the file. weight: [heads * head_dim, hidden]."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, model, tokenizer) -> None:
    """A Llama-style LM and its byte-level BPE tokenizer as one f32 GGUF file, under llama.cpp's key names."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]  # added too
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the file holds the embedding once
        weight = tensor.float().numpy()
        if name in TOP_NAMES:
            name = TOP_NAMES[name]
        else:  # model.layers.{i}.{module}.weight
            _, _, layer, *module, kind = name.split(".")
            module = ".".join(module)
            if module == "self_attn.q_proj":
                weight = _rotary_order(weight, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                weight = _rotary_order(weight, config.num_key_value_heads)
            name = f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"
        writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_folders(checkpoints, tmp_path_factory):  # noqa: F811
    """(safetensors folder, GGUF folder) of test_families' tiny Llama. Its tokenizer adds no space before a text,
    as SmolLM2's does: a GGUF byte-level vocabulary has no setting for it."""
    source, folder = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("gguf")
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"])
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    write_gguf(folder / GGUF_FILE, model, tokenizer)
    return source, folder


def test_the_gguf_file_gives_the_same_tokens_and_logits_as_the_saved_model(llama_folders):
    source, folder = llama_folders
    from_folder = build_language(apply_overrides(Config(), [f"language.model={source}"]).language)
    from_gguf = build_language(apply_overrides(Config(), [f"language.model={folder}",
                                                          f"language.gguf_file={GGUF_FILE}"]).language)
    text = "Question: what color is the circle? Answer:"
    ids = from_folder.tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, from_gguf.tokenizer(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.allclose(from_folder.model(ids).logits, from_gguf.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_gguf_lm_trains_saves_and_reloads(checkpoints, llama_folders, examples, tmp_path, mode):  # noqa: F811
    torch.manual_seed(0)
    parts = {**checkpoints, "gguf": llama_folders[1]}
    model = build_vlm(family_config(parts, "clip", "gguf", f"language.gguf_file={GGUF_FILE}",
                                    f"language.train={mode}"))
    pixels, prompts, targets = _batch(model, examples)
    _train_steps(model, pixels, prompts, targets)
    model.save(tmp_path / "model")
    saved = sorted(path.name for path in (tmp_path / "model" / "language").iterdir())
    # LoRA: the adapter, the base named by folder and file; full: plain safetensors, no GGUF needed again
    assert ("adapter_model.safetensors" in saved) == (mode == "lora")
    assert ("model.safetensors" in saved) == (mode == "full")
    loaded = VLM.load(tmp_path / "model", device="cpu")
    assert loaded.config.language.gguf_file == GGUF_FILE
    with torch.no_grad():
        assert torch.equal(model(pixels, prompts, targets), loaded(pixels, prompts, targets))
    assert model.generate(pixels, prompts, 6) == loaded.generate(pixels, prompts, 6)


def test_a_gguf_file_without_a_model_or_not_there_is_one_line(llama_folders):
    folder = llama_folders[1]
    with pytest.raises(ConfigError, match="language.gguf_file='x.gguf'.*language.model is not set"):
        apply_overrides(Config(), ["language.gguf_file=x.gguf"])
    cfg = apply_overrides(Config(), [f"language.model={folder}", "language.gguf_file=missing.gguf"])
    with pytest.raises(CheckpointError, match=f"language.model='{folder}' cannot be loaded") as raised:
        build_language(cfg.language)
    assert "\n" not in str(raised.value)
