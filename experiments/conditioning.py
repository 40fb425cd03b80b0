"""Reproduce, then fix, the empty-caption failure of a Q-Former + GPT-2 captioner, on the synthetic world (CPU).

The setting follows the failed recipe in miniature: a frozen vision tower, a trainable Q-Former, and a language
model that already knows the caption language before it ever sees an image (each LM is first trained on captions
of other scenes as text alone: the "pretrained GPT-2" / "pretrained Flan-T5" of the real recipe). Then:

(a) causes, each switched on alone over a healthy baseline: padding trained as EOS, a one-token visual prefix,
    full fine-tuning at a 10x learning rate, too little data (40 images); and all four together;
(b) remedies, each applied to the cause it answers: a lower EOS loss weight and a minimum caption length (padding
    as EOS), gated cross-attention with the LM trained or frozen (short prefix), LoRA-only tuning of the LM (high
    learning rate); more data is the baseline itself (1500 images instead of 40);
(c) the tiny T5 encoder-decoder in the baseline setting and with all four causes.

Every run is trained with `vlmlab.train.train` and judged by `vlmlab.diagnose.diagnose` on the test split;
several seeds each. Results go to OUT/results.jsonl (one record per run; runs already recorded are skipped, so an
interrupted sweep continues) and the tables are printed as markdown.

    nice -n 10 python experiments/conditioning.py --out runs/conditioning
    python experiments/conditioning.py --out runs/conditioning --only baseline one_query --seeds 0
    python experiments/conditioning.py --out runs/conditioning --report      # the tables again, nothing run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from vlmlab.config import Config, DataConfig, LanguageConfig, apply_overrides
from vlmlab.data import load_examples
from vlmlab.diagnose import diagnose, read_train_log
from vlmlab.language import build_language
from vlmlab.model import VLM
from vlmlab.presets import get_preset
from vlmlab.prompts import format_prompt
from vlmlab.tokenizer import train_tokenizer
from vlmlab.train import train, training_texts

# Small enough for a shared 2-core CPU: a run trains in well under a minute.
SIZES = ["vision.hidden_size=64", "vision.num_layers=2", "vision.num_heads=2", "vision.patch_size=16",
         "connector.hidden_size=64", "connector.num_layers=1", "connector.num_heads=2",
         "language.hidden_size=64", "language.num_layers=2", "language.num_heads=2", "language.vocab_size=300"]
BASE = [*SIZES, "vision.train=frozen", "connector.num_queries=8", "data.questions_per_image=0",
        "data.train_images=1500", "data.eval_images=48", "train.batch_size=32", "train.max_steps=200",
        "train.warmup_steps=20", "train.lr=2e-3", "train.eval_every=0", "train.save_every=0", "train.log_every=10",
        "train.alarm_every=50", "train.alarm_warmup=100", "train.alarm_examples=24", "eval.caption_metrics=false",
        "eval.shuffled_control=false", "eval.caption_max_new_tokens=24"]
CAUSES = {
    "padding_as_eos": ["language.train_padding_as_eos=true"],
    "one_query": ["connector.num_queries=1"],
    "high_lr": ["train.lr=2e-2"],
    "little_data": ["data.train_images=40"],
}
ALL_CAUSES = [override for overrides in CAUSES.values() for override in overrides]
LORA = ["language.train=lora", "language.lora_rank=8", "language.lora_alpha=16", "language.lora_dropout=0.0"]
XATTN = ["language.fusion=cross_attention"]


def condition(group, family, overrides, reuse=None):
    """A run: `overrides` over BASE; `reuse` names a trained run to diagnose again under other eval settings."""
    return {"group": group, "family": family, "overrides": overrides, "reuse": reuse}


CONDITIONS = {
    "baseline": condition("baseline", "gpt2", []),
    **{name: condition("cause", "gpt2", overrides) for name, overrides in CAUSES.items()},
    "all_causes": condition("cause", "gpt2", ALL_CAUSES),
    # Padded on the left, all but the longest captions of a batch of 32 start with EOS: with each EOS weighing
    # under 1/31, the first word of the unpadded ones can outweigh them at the first step.
    "padding_as_eos+eos_weight": condition("remedy", "gpt2", [*CAUSES["padding_as_eos"],
                                                              "language.eos_loss_weight=0.01"]),
    "padding_as_eos+min_tokens": condition("remedy", "gpt2", ["eval.min_new_tokens=8"], reuse="padding_as_eos"),
    "cross_attention": condition("remedy", "gpt2", XATTN),
    "frozen_lm": condition("remedy", "gpt2", ["language.train=frozen"]),
    "frozen_lm+cross_attention": condition("remedy", "gpt2", ["language.train=frozen", *XATTN]),
    "one_query+frozen_lm+cross_attention": condition("remedy", "gpt2", [*CAUSES["one_query"],
                                                                        "language.train=frozen", *XATTN]),
    "high_lr+lora": condition("remedy", "gpt2", [*CAUSES["high_lr"], *LORA]),
    "t5_baseline": condition("t5", "t5", []),
    "t5_all_causes": condition("t5", "t5", ALL_CAUSES),
}
PRESET = {"gpt2": "tiny-gpt2", "t5": "tiny-qformer"}
PRETRAIN_STEPS, PRETRAIN_IMAGES = 300, 1500  # the LM's caption-language prior, learned from text alone


def sizes() -> Config:
    return apply_overrides(Config(), SIZES)


def pretrain_language(family: str, seed: int, out: Path) -> Path:
    """A tiny LM that knows the caption language: trained on `prompt -> caption` as text alone (no visual
    tokens), on scenes of another world seed than the image-caption pairs, then saved with save_pretrained."""
    directory = out / f"lm-{family}-seed{seed}"
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    data = DataConfig(train_images=PRETRAIN_IMAGES, questions_per_image=0, seed=1000 + seed)
    examples = load_examples("synthetic", "train", data)
    # The same tokenizer recipe a VLM run uses, trained on the caption text with the VQA prompt included.
    tokenizer = train_tokenizer(training_texts(examples, data) + ["Question: Answer:"], sizes().language.vocab_size)
    lm = build_language(LanguageConfig(**{**vars(sizes().language), "family": family}), tokenizer)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    no_image = torch.zeros(64, 0, lm.hidden_size)  # [B, 0, D]: the LM reads the prompt alone
    for step in range(PRETRAIN_STEPS):
        batch = [examples[(step * 64 + i) % len(examples)] for i in range(64)]
        prompts = lm.encode_prompts([format_prompt(data, e.question) for e in batch])
        loss = lm.loss(no_image, prompts, lm.encode_targets([e.target for e in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.save(directory)
    return directory


def run(name: str, seed: int, out: Path) -> dict:
    spec = CONDITIONS[name]
    lm_dir = pretrain_language(spec["family"], seed, out)
    run_dir = out / f"{spec['reuse'] or name}-seed{seed}"
    started = time.perf_counter()
    if spec["reuse"] is None:
        cfg = apply_overrides(get_preset(PRESET[spec["family"]]),
                              [*BASE, f"language.model={lm_dir}", *spec["overrides"], f"train.seed={seed}"])
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary; the tables below say it all
            train(cfg, run_dir)
    return {"name": name, "seed": seed, "seconds": time.perf_counter() - started, **judge(name, seed, out)}


def judge(name: str, seed: int, out: Path) -> dict:
    """The training alarm's verdicts from the run's log, and `diagnose` on the test split."""
    spec = CONDITIONS[name]
    run_dir = out / f"{spec['reuse'] or name}-seed{seed}"
    model = VLM.load(run_dir, device="cpu")
    cfg = apply_overrides(model.config, spec["overrides"] if spec["reuse"] else [])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    alarms = [[r["step"], r["conditioning"]["verdict"]] for r in log if "conditioning" in r]
    report = diagnose(model, load_examples(cfg.data.eval, "test", cfg.data), cfg,
                      read_train_log(run_dir / "train_log.jsonl"))
    return {"alarms": alarms, "report": report}


METRICS = [("empty", "empty_output_rate"), ("EOS first", "eos_first_rate"),
           ("unchanged (shuffled)", "unchanged_with_shuffled_images"), ("loss gap", "reference_loss_gap"),
           ("loss (real)", lambda r: r["reference_loss"]["real"]), ("words", "mean_output_words"),
           ("attn on image", "visual_attention_share")]


def _value(report: dict, key):
    return key(report) if callable(key) else report.get(key)


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict], names: list[str]) -> list[str]:
    header = ["condition", *[label for label, _ in METRICS], "verdicts", "alarm at 100/150/200, per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        runs = [r for r in records if r["name"] == name]
        if not runs:
            continue
        reports = [r["report"] for r in runs]
        verdicts = {}
        for report in reports:
            verdicts[report["verdict"]] = verdicts.get(report["verdict"], 0) + 1
        # The training alarm's verdict at each check: "i" ignores_image, "c" collapsed, "-" uses_image (no warning).
        alarms = ["".join("-" if verdict == "uses_image" else verdict[0] for _, verdict in r["alarms"]) for r in runs]
        cells = [f"`{name}`", *[_mean_sd([_value(rep, key) for rep in reports]) for _, key in METRICS],
                 ", ".join(f"{v} {k}" for k, v in sorted(verdicts.items())),
                 " ".join(alarms)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def causes_table(records: list[dict], names: list[str]) -> list[str]:
    """How often diagnose named each cause, over all runs of a condition and over those not using the image."""
    lines = ["| condition | runs | not using the image | suspected causes named (runs; among those not using it) |",
             "|---|---|---|---|"]
    for name in names:
        reports = [r["report"] for r in records if r["name"] == name]
        named = {}
        for report in reports:
            failed = report["verdict"] != "uses_image"
            for cause in report["suspected_causes"]:
                total, among_failed = named.get(cause["cause"], (0, 0))
                named[cause["cause"]] = (total + 1, among_failed + failed)
        text = ", ".join(f"{cause} ({total}; {failed})" for cause, (total, failed) in named.items()) or "none"
        not_using = sum(report["verdict"] != "uses_image" for report in reports)
        if reports:
            lines.append(f"| `{name}` | {len(reports)} | {not_using} | {text} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and results.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(CONDITIONS), help="run only these conditions")
    parser.add_argument("--rediagnose", action="store_true",
                        help="judge the recorded runs again with the current diagnose (no training)")
    parser.add_argument("--report", action="store_true", help="only print the tables of the recorded runs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on a small shared CPU, one thread per process is several times faster than two
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["name"], r["seed"]) for r in records}
    names = args.only or list(CONDITIONS)
    started = time.perf_counter()
    if args.rediagnose:
        for record in records:
            record.update(judge(record["name"], record["seed"], args.out))
        results.write_text("".join(json.dumps(record) + "\n" for record in records))
    for name in [] if args.report else names:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            record = run(name, seed, args.out)
            records.append(record)
            with results.open("a") as out:
                out.write(json.dumps(record) + "\n")
            report = record["report"]
            print(f"{name} seed {seed}: {report['verdict']} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if not args.report:
        print(f"sweep: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    for group in ("baseline", "cause", "remedy", "t5"):
        print(f"\n### {group}\n")
        print("\n".join(table(records, [n for n in names if CONDITIONS[n]["group"] == group])))
    print("\n### suspected causes\n")
    print("\n".join(causes_table(records, names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
