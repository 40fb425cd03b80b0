"""A tiny LM that knows the caption language before it sees an image (`language.pretrain_steps`).

A pretrained GPT-2 or Flan-T5 can write fluent text without looking at the image, which is the temptation the
empty-caption failure gives in to; a tiny LM built from scratch cannot. So, offline, the tiny LM is first trained
on `caption prompt -> caption` as text alone (no visual tokens), on scenes of another world seed
(`data.seed + 1000 + train.seed`, `language.pretrain_images` of them), saved with `save_pretrained`, and the run
then loads it by path, as it would load `gpt2`. Such an LM depends only on its architecture, its text and its seed,
so it is kept under the run's cache folder (`train.feature_cache_dir`, or OUT/feature_cache) in `lm-<key>/`, and
every run of a study that asks for the same one reads the same folder.

`vlmlab pretrain-lm` (`pretrain_lm`) is the same for world v2, as a folder of the user's choosing: a tiny LM of
`language.family` trained on the world's text corpus (its facts, the facts as sentences, captions of scenes no
split draws; no image), so that a run started from it (`language.model=DIR`) begins with the knowledge questions'
facts known, as a run started from Flan-T5 begins with English.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

from vlmlab.config import Config, ConfigError, DataConfig, LanguageConfig
from vlmlab.data import load_examples, world
from vlmlab.language import build_language
from vlmlab.log import info
from vlmlab.prompts import QUESTION, format_prompt, training_texts, vqa_template
from vlmlab.tokenizer import train_tokenizer

FORMAT = 1  # raised when what the key covers changes
BATCH, LR = 64, 3e-3
WARMUP_STEPS = 50  # pretrain-lm's warm-up, before its cosine decay
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
        fit_text(lm, [(format_prompt(data, e.question), e.target) for e in examples], recipe["steps"],
                 "pretrain LM on text")
    return lm


def fit_text(lm, pairs: list[tuple[str, str]], steps: int, desc: str, facts_first: bool = False) -> float:
    """Trains `lm` on `prompt -> target` text pairs with no visual token, BATCH pairs a step in their order
    (cycling), at a constant LR; returns the last step's loss. `facts_first` (pretrain-lm) is what short facts
    among long captions need: each pair weighs the same in the loss (its own token mean; a two-token fact then
    counts as much as a thirty-token caption), and the LR warms up, then decays to 0 on a cosine (at a constant
    3e-3 a tiny T5 keeps forgetting facts it had learned)."""
    optimizer = torch.optim.AdamW(lm.parameters(), lr=LR)
    schedule = (get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, steps) if facts_first
                else get_constant_schedule(optimizer))
    no_image = torch.zeros(BATCH, 0, lm.hidden_size)  # [B, 0, D]: the LM reads the prompt alone
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc=desc, leave=False, disable=None):
        batch = [pairs[(step * BATCH + i) % len(pairs)] for i in range(BATCH)]
        prompts = lm.encode_prompts([prompt for prompt, _ in batch])
        targets = lm.encode_targets([target for _, target in batch])
        if facts_first:
            lengths = torch.tensor([len(target) for target in targets], dtype=torch.float32)
            loss = (lm.answer_losses(no_image, prompts, targets) / lengths).mean()
        else:
            loss = lm.loss(no_image, prompts, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()


def fact_accuracy(lm, data: DataConfig) -> float:
    """The share of the world's facts (`world.facts()`, asked in `data.prompt`'s template) the LM answers exactly,
    greedily and with no image: what it knows before it sees a picture."""
    questions, answers = zip(*world.facts())
    prompts = lm.encode_prompts([format_prompt(data, question) for question in questions])
    said = lm.generate(torch.zeros(len(prompts), 0, lm.hidden_size), prompts, max_new_tokens=8)
    return sum(s == a for s, a in zip(said, answers)) / len(answers)


def pretrain_lm(cfg: Config, out: Path, steps: int, scenes: int) -> dict:
    """`vlmlab pretrain-lm`: a tiny LM of `cfg.language` trained `steps` steps on world v2's corpus (with the
    captions of `scenes` scenes), saved to `out` with `save_pretrained` and its recipe; returns the recipe, which
    records the last loss and the share of facts it answers."""
    if cfg.language.model:
        raise ConfigError(f"language.model={cfg.language.model!r} is not allowed here: pretrain-lm builds a tiny "
                          "LM from scratch (language.family, hidden_size, num_layers, num_heads, vocab_size)")
    if steps < 1 or scenes < 0:
        raise ValueError(f"--steps must be 1 or more and --scenes 0 or more, got {steps} and {scenes}")
    world_cfg = cfg.data.world
    if world_cfg.generator == "v1":  # world v1 has no facts: its captions would teach the LM the wrong world
        world_cfg = replace(world_cfg, generator="scatter")
        info("pretrain-lm: corpus from world v2 (scatter), whose facts its knowledge questions ask")
    world_seed = cfg.data.seed + WORLD_SEED_OFFSET
    pairs = world.corpus(scenes, world_seed, world_cfg, cfg.data)
    facts, sentences = len(world.facts()), len(world.statements())
    known = facts + sentences  # corpus() puts them first, the captions after
    # The facts repeated until they are about half of the pairs the LM reads (and, each pair weighing the same, of
    # its loss): read once among 2000 captions they are 5%, and the LM learns the captions' words but answers
    # every fact with the commonest answer.
    copies = max(1, round(scenes / known))
    pairs += pairs[:known] * (copies - 1)
    random.Random(cfg.train.seed).shuffle(pairs)  # facts, sentences and captions mixed in every batch
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        tokenizer = train_tokenizer([text for pair in pairs for text in pair], cfg.language.vocab_size)
        lm = build_language(cfg.language, tokenizer)
        last_loss = fit_text(lm, pairs, steps, "pretrain-lm on the world's text", facts_first=True)
    lm.model.eval()
    recipe = {"format": FORMAT, "language": {name: getattr(cfg.language, name) for name in ARCHITECTURE},
              "steps": steps, "batch_size": BATCH, "lr": LR, "warmup_steps": WARMUP_STEPS, "schedule": "cosine",
              "torch_seed": cfg.train.seed,
              "corpus": {"generator": world_cfg.generator, "world_seed": world_seed, "scenes": scenes,
                         "pairs": len(pairs), "facts": facts, "sentences": sentences,
                         "fact_copies": copies},
              "prompt": vqa_template(cfg.data.prompt), "caption_prompt": format_prompt(cfg.data, None),
              "last_loss": round(last_loss, 4), "fact_accuracy": round(fact_accuracy(lm, cfg.data), 4)}
    out.mkdir(parents=True, exist_ok=True)
    lm.save(out)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe
