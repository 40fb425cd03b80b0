"""A tiny LM that knows the caption language before it sees an image (`language.pretrain_steps`).

A pretrained GPT-2 or Flan-T5 can write fluent text without looking at the image, which is the temptation the
empty-caption failure gives in to; a tiny LM built from scratch cannot. So, offline, the tiny LM is first trained
on `caption prompt -> caption` as text alone (no visual tokens), on scenes of another world seed
(`data.seed + 1000 + train.seed`, `language.pretrain_images` of them), saved with `save_pretrained`, and the run
then loads it by path, as it would load `gpt2`. Such an LM depends only on its architecture, its text and its seed,
so it is kept under the run's cache folder (`train.feature_cache_dir`, or OUT/feature_cache) in `lm-<key>/`, and
every run of a study that asks for the same one reads the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmlab.config import Config, DataConfig, LanguageConfig
from vlmlab.data import load_examples
from vlmlab.language import build_language
from vlmlab.log import info
from vlmlab.prompts import QUESTION, format_prompt, training_texts, vqa_template
from vlmlab.tokenizer import train_tokenizer

FORMAT = 1  # raised when what the key covers changes
BATCH, LR = 64, 3e-3
WORLD_SEED_OFFSET = 1000  # the scenes it reads are none of the run's own
ARCHITECTURE = ("family", "hidden_size", "num_layers", "num_heads", "vocab_size", "max_prompt_tokens",
                "max_target_tokens")


def _recipe(cfg: Config) -> dict:
    return {"format": FORMAT, "language": {name: getattr(cfg.language, name) for name in ARCHITECTURE},
            "steps": cfg.language.pretrain_steps, "images": cfg.language.pretrain_images,
            "world_seed": cfg.data.seed + WORLD_SEED_OFFSET + cfg.train.seed, "torch_seed": cfg.train.seed,
            "prompt": vqa_template(cfg.data.prompt), "caption_prompt": format_prompt(cfg.data, None)}


def pretrained_language(cfg: Config, cache_root: Path) -> Path:
    """The folder of the tiny LM `cfg` asks for, trained now unless a run before has left it there."""
    recipe = _recipe(cfg)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root / f"lm-{key}"
    if (folder / "config.json").is_file():
        info(f"language: the text-pretrained tiny LM of {folder}")
        return folder
    partial = cache_root / f".lm-{key}-{uuid.uuid4().hex[:8]}"  # written aside, then renamed into place
    _train(cfg, recipe).save(partial)
    (partial / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    try:
        os.replace(partial, folder)
    except OSError:  # another run of the study finished the same LM first: theirs is the same
        pass
    return folder


def _train(cfg: Config, recipe: dict):
    data = replace(DataConfig(), train_images=recipe["images"], questions_per_image=0, captions=True,
                   seed=recipe["world_seed"], prompt=cfg.data.prompt, caption_prompt=cfg.data.caption_prompt)
    with torch.random.fork_rng():  # the run's own initialisation draws as if nothing ran before it
        torch.manual_seed(recipe["torch_seed"])
        examples = load_examples("synthetic", "train", data)
        # The captions with their prompt, and the VQA prompt's own words: what the LM will read later.
        prompt_words = " ".join(vqa_template(data.prompt).replace(QUESTION, "").split())
        tokenizer = train_tokenizer(training_texts(examples, data) + [prompt_words], cfg.language.vocab_size)
        lm = build_language(LanguageConfig(**recipe["language"]), tokenizer)
        optimizer = torch.optim.AdamW(lm.parameters(), lr=LR)
        no_image = torch.zeros(BATCH, 0, lm.hidden_size)  # [B, 0, D]: the LM reads the prompt alone
        for step in tqdm(range(recipe["steps"]), desc="pretrain LM on text", leave=False, disable=None):
            batch = [examples[(step * BATCH + i) % len(examples)] for i in range(BATCH)]
            prompts = lm.encode_prompts([format_prompt(data, e.question) for e in batch])
            loss = lm.loss(no_image, prompts, lm.encode_targets([e.target for e in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return lm
