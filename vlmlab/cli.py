"""The `vlmlab` command: train, eval, ask, caption, diagnose, sweep, report, presets, plan, export, bench, demo,
pretrain-lm, pretrain-vision.

Every error a user can cause (a bad config key, a missing file, a broken image) ends as one line on stderr and a
non-zero exit; `caption` goes on past a bad image and exits 1 when any image failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG_TRAIN = """examples:
  vlmlab train --out runs/default                      # the offline default: synthetic world, CPU, minutes
  vlmlab train --out runs/gpt2 --preset tiny-gpt2 train.max_steps=500
  vlmlab train --out runs/mine data.train=train.jsonl data.eval=val.jsonl
  vlmlab train --out runs/default --resume             # continue the last checkpoint in runs/default

overrides are section.field=value with sections vision, connector, language, data, train, eval;
a wrong key is answered with the list of valid ones."""


EPILOG_EVAL = """datasets (--data SPEC, eval.split=train|val|test picks the split):
  synthetic                         the built-in synthetic world
  data/val.jsonl                    a JSONL file of image, question | caption, answers
  vqav2:/data/vqa                   v2_OpenEnded_mscoco_val2014_questions.json,
                                    v2_mscoco_val2014_annotations.json, val2014/
  okvqa:/data/okvqa                 OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json, val2014/
  textvqa:/data/textvqa             TextVQA_0.5.1_val.json, train_images/
  coco-captions:/data/coco          dataset_coco.json (Karpathy split), val2014/
  flickr8k:/data/flickr8k           Flickr8k.token.txt, Flickr_8k.testImages.txt, Flicker8k_Dataset/
  vqav2 | vqav2:someone/VQAv2       a hub copy (the default one, or a named one; needs `datasets`)

examples:
  vlmlab eval --model runs/vqa --data vqav2:/data/vqa data.eval_size=5000 --results vqa_results.json
  vlmlab eval --model runs/cap --data flickr8k:/data/flickr8k --out metrics.json"""


EPILOG_SWEEP = """a study file:
  name: connector-and-prompt
  base: {preset: default, overrides: [train.max_steps=600]}   # preset, config (a YAML file), overrides
  seeds: [0, 1, 2]                 # train.seed of each run; the eval set is the same for every run
  design: one-at-a-time            # `reference` + one variant per other level; or grid: every combination
  diagnose: false                  # also run `vlmlab diagnose` on each run (diagnose.json, in the report)
  axes:                            # the first level of each axis is its reference level
    connector: {mlp: [], qformer: [connector.kind=qformer, connector.num_queries=16]}
    prompt: {qa: [], none: [data.prompt=none]}
  # a level may start from another variant's model of the same seed: [train.init_from=@VARIANT]
  # scales (optional): {tiny: {overrides: [...], prepare: {lm: [pretrain-lm, --family, t5]}}, colab: {preset: ...}}
  #   a level is then a list for every scale or {tiny: [...], colab: [...]}; @prepared/lm names the folder made

examples:
  vlmlab sweep --list                                    # the shipped studies
  vlmlab sweep study.yaml --out runs/study --plan        # the runs, their order, time and disk
  vlmlab sweep seed-comparison --scale colab --out runs/sc-colab --plan   # a shipped study at another scale
  vlmlab sweep study.yaml --out runs/study --jobs 2      # run (again: finished runs are skipped)
  vlmlab sweep study.yaml --out runs/study --report      # redraw report.md and the plots, nothing trained
  vlmlab sweep study.yaml --out runs/study --launcher slurm --partition gpu --time 120 --gpus 1 --jobs 16"""


PRETRAIN_LM_STEPS, PRETRAIN_LM_SCENES = 600, 500
PRETRAIN_VISION_STEPS, PRETRAIN_VISION_SCENES = 600, 4000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmlab",
        description="Build a small vision-language model from parts, train it, and measure whether it uses the image.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a VLM (default: the offline synthetic-world recipe on CPU)",
                                epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--out", required=True, type=Path, help="run directory (config, checkpoints, model, metrics)")
    train.add_argument("--preset", default=None, help="named preset (see `vlmlab presets`); default: default")
    train.add_argument("--config", type=Path, help="YAML file of sections and fields, applied over the preset")
    train.add_argument("--resume", action="store_true", help="continue the last checkpoint in --out")
    train.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")

    evaluate = commands.add_parser("eval", help="evaluate a trained model; prints metrics JSON",
                                   epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--model", required=True, type=Path, help="run or model directory")
    evaluate.add_argument("--data", metavar="SPEC",
                          help="dataset name, NAME:FOLDER, NAME:HUB_ID or JSONL path (default: the model's eval data)")
    evaluate.add_argument("--out", type=Path, help="also write the metrics JSON here")
    evaluate.add_argument("--results", type=Path, metavar="FILE",
                          help='write the VQA answers as the official result file, [{"question_id", "answer"}]')
    evaluate.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. eval.max_examples=200")

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("--model", required=True, type=Path, help="run or model directory")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help="the question")
    ask.add_argument("--explain", type=Path, metavar="OUT.png",
                     help="also save where the answer looked (a heatmap on the image) and print its "
                          "probability with and without the image")
    ask.add_argument("--explain-method", choices=("occlusion", "attention"), default="occlusion",
                     help="the heatmap: occlusion (default: how much the answer's log-probability drops when each "
                          "cell of the image is blanked) or attention (the answer's attention on the visual tokens)")

    caption = commands.add_parser("caption", help="caption images; one JSON line per image")
    caption.add_argument("--model", required=True, type=Path, help="run or model directory")
    caption.add_argument("images", nargs="+", help="image files")

    diagnose = commands.add_parser(
        "diagnose", help="does the model use its image? signals, a verdict and likely causes",
        description="Measures on an eval set whether the model's outputs depend on the image: empty outputs, EOS "
                    "as the first token, outputs identical across images, scores and reference loss with real, "
                    "shuffled and blank images, attention on the visual tokens. Ends with a verdict (uses_image, "
                    "ignores_image, collapsed), one sentence why, and the suspected causes with what to try.")
    diagnose.add_argument("--model", required=True, type=Path, help="run or model directory")
    diagnose.add_argument("--data", metavar="SPEC", help="dataset spec (default: the model's eval data)")
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON")
    diagnose.add_argument("--out", type=Path, metavar="FILE", help="also write the report as JSON here")
    diagnose.add_argument("--max-examples", type=int, default=256, metavar="N",
                          help="examples of the split to use (default 256; 0: all)")
    diagnose.add_argument("overrides", nargs="*", metavar="section.field=value",
                          help="e.g. eval.split=val eval.caption_metrics=false")

    sweep = commands.add_parser(
        "sweep", help="a study: variants x seeds as ordinary training runs, then intervals, controls and plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs every (variant, seed) of a study file as a `vlmlab train` run in DIR/runs/VARIANT/seedK/ "
                    "(finished runs are skipped, interrupted ones resumed, a changed config refused), then writes "
                    "DIR/summary.json, results.csv, report.md and plots/: each metric's mean over seeds with a 95% "
                    "interval beside its shuffled-image control, and each variant's paired difference from the "
                    "reference. The study file's format is below; the README says more.",
        epilog=EPILOG_SWEEP)
    sweep.add_argument("study", nargs="?", metavar="STUDY", help="a study file (YAML), or the name of a shipped one")
    sweep.add_argument("--out", type=Path, help="sweep directory (runs, ledger, report)")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="runs at once: the CPU cores split between them, or one GPU each (default 1)")
    sweep.add_argument("--plan", action="store_true", help="print the runs, their order, time and disk; run nothing")
    sweep.add_argument("--report", action="store_true", help="only redraw the report from the finished runs")
    sweep.add_argument("--list", action="store_true", help="list the shipped studies")
    sweep.add_argument("--gpu", default="t4", choices=["t4", "l4", "a100-40g", "a100-80g"],
                       help="--plan: the GPU whose time runs with pretrained parts are estimated on (default t4)")
    sweep.add_argument("--scale", metavar="NAME",
                       help="which of the study's scales to run (e.g. tiny, colab; default: its first)")
    sweep.add_argument("--launcher", default="local", choices=["local", "submitit-local", "slurm"],
                       help="local processes (default), SLURM through submitit, or submitit's local executor")
    sweep.add_argument("--partition", help="--launcher slurm: the partition")
    sweep.add_argument("--time", type=int, default=60, metavar="MINUTES", help="submitit: time limit per run")
    sweep.add_argument("--gpus", type=int, default=1, help="--launcher slurm: GPUs per run (default 1)")
    sweep.add_argument("--cpus", type=int, default=4, help="submitit: CPU cores per run (default 4)")

    report = commands.add_parser(
        "report", help="draw a run's report: plots and an HTML page in RUN/report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reads a run directory (config.yaml, train_log.jsonl, metrics.json, predictions.jsonl) and\n"
                    "writes RUN/report/*.png and RUN/report/index.html: training loss and learning rate,\n"
                    "validation accuracy beside its shuffled-image control, the image-reliance alarm's signals,\n"
                    "accuracy per question type, and sample test images with the answers. Nothing is trained or\n"
                    "run; what the run lacks is left out. `vlmlab train` draws it at the end of every run.",
        epilog="examples:\n  vlmlab report runs/default          # then open runs/default/report/index.html")
    report.add_argument("run", type=Path, metavar="RUN", help="run directory (the --out of `vlmlab train`)")

    commands.add_parser("presets", help="list the presets")

    plan = commands.add_parser(
        "plan", help="will a preset fit a GPU? peak memory, and the micro-batch / checkpointing that fit",
        description="Simulates one training step of the config at its real size (fake tensors: nothing is "
                    "downloaded or allocated) and reports its peak GPU memory for each candidate micro-batch, "
                    "gradient accumulation and gradient checkpointing, then proposes the first that fits.",
        epilog="example:\n  vlmlab plan --preset recommended --gpu t4\n  vlmlab plan --preset recommended-t5-large "
               "--gpu t4 train.batch_size=64", formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--preset", required=True, help="named preset (see `vlmlab presets`)")
    plan.add_argument("--gpu", required=True, choices=["t4", "l4", "a100-40g", "a100-80g"], help="the GPU")
    plan.add_argument("--config", type=Path, help="YAML file of sections and fields, applied over the preset")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")

    export = commands.add_parser(
        "export", help="copy a trained model to a folder of its own, optionally with LoRA/DoRA merged in",
        description="Writes the model of a run (or model) directory to --out. A LoRA/DoRA part is kept as its "
                    "adapter and the base model's name unless --merge folds the adapter into the base weights, "
                    "which stores that part in full and makes it a plain transformers model again. The folder "
                    "gets a model card (README.md: parts, training, data, prompts, decoding, metrics beside the "
                    "shuffled-image control, the command that reproduces it) and the run's metrics.json.")
    export.add_argument("--model", required=True, type=Path, help="run or model directory")
    export.add_argument("--out", required=True, type=Path, help="folder to write the model to")
    export.add_argument("--merge", action="store_true", help="merge LoRA/DoRA adapters into their base weights")
    export.add_argument("--format", choices=["vlmlab", "transformers"], default="vlmlab",
                        help="vlmlab: the model folder VLM.load reads; transformers: a LlavaForConditionalGeneration "
                             "checkpoint plain transformers loads (CLIP/SigLIP -> mlp -> Llama only; others say "
                             "they need vlmlab to load)")
    export.add_argument("--push-to-hub", metavar="REPO", default="",
                        help="then upload the folder to this hub repo (user/name; needs a token: hf auth login)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    bench = commands.add_parser(
        "bench", help="vlmlab against transformers' BLIP-2 of the same architecture: training, generation, memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Builds the preset's architecture twice with random weights, as vlmlab and as transformers' "
                    "Blip2ForConditionalGeneration, and trains both on the same batches with the tower frozen "
                    "(vlmlab from its feature cache), then generates with both. Each side runs in a process of its "
                    "own. Prints samples/s (first and later epochs), generated tokens/s and peak memory, and the "
                    "ratios vlmlab / BLIP-2.",
        epilog="examples:\n  vlmlab bench                                   # tiny-qformer, seconds on a CPU\n"
               "  vlmlab bench --preset recommended --json       # CLIP ViT-L/14 + Q-Former + Flan-T5-base (a GPU)\n"
               "  vlmlab bench --preset recommended train.batch_size=4 --steps 2 --epochs 2   # the same on a CPU")
    bench.add_argument("--preset", default="tiny-qformer",
                       help="named preset whose architecture is measured (a ViT and a Q-Former, as BLIP-2 has)")
    bench.add_argument("--steps", type=int, default=4, help="training steps per epoch (default 4)")
    bench.add_argument("--epochs", type=int, default=3, help="epochs, the first one measured apart (default 3)")
    bench.add_argument("--questions-per-image", type=float, default=1.0, metavar="Q",
                       help="average questions per image, 1 to 2 (default 1, the strictest case: vlmlab runs the "
                            "tower and connector once per image, BLIP-2 once per question); the recommended "
                            "recipe's VQAv2 40k draw has about 1.22")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--cpu-time", action="store_true",
                       help="on a CPU shared with other work: time by each side's CPU time, torch on one thread")
    bench.add_argument("overrides", nargs="*", metavar="section.field=value",
                       help="e.g. train.batch_size=8 train.precision=bf16 eval.max_new_tokens=10")
    pretrain_lm = _pretrain_parser(
        commands, "pretrain-lm",
        "train a tiny LM on the synthetic world's text (facts, captions; no image) to start from",
        "Trains a tiny language model of the preset's language section (--family picks t5, gpt2 or llama) on world "
        "v2's text corpus: every fact the knowledge questions need, asked in the VQA prompt and stated as sentences, "
        "and captions of scenes no split draws. No image is read. The model and its tokenizer are saved with "
        "save_pretrained to --out, with recipe.json (corpus, steps, last loss, share of facts it answers), and a run "
        "starts from it by path as it would from Flan-T5: language.model=DIR, with language.train full, frozen, lora "
        "or dora.",
        "examples:\n  vlmlab pretrain-lm --out runs/lm-t5\n"
        "  vlmlab train --out runs/knows data.world.generator=scatter language.model=runs/lm-t5\n"
        "  vlmlab pretrain-lm --out runs/lm-gpt2 --family gpt2 --steps 1500 language.hidden_size=256",
        saves="the LM and its tokenizer", follows="language section (and data.prompt)",
        steps=(PRETRAIN_LM_STEPS, "text pairs"), scenes=(PRETRAIN_LM_SCENES, "scenes whose captions join the facts"),
        example="language.hidden_size=256 data.world.generator=tiles train.seed=1")
    pretrain_lm.add_argument("--family", choices=["t5", "gpt2", "llama"], default=None,
                             help="the tiny LM's transformers family (default: the preset's, t5)")
    _pretrain_parser(
        commands, "pretrain-vision",
        "train a tiny vision tower on the synthetic world's scenes (no text) to start from",
        "Trains a tiny vision tower of the preset's vision section on world v2's scenes of a seed no split draws: "
        "from its features, max-pooled over the map, one linear layer says which of the 32 (colour, shape) pairs the "
        "scene holds (the layer is dropped after). The tower and its preprocessing are saved with save_pretrained to "
        "--out, with recipe.json (steps, held-out label and exact-set accuracy), and a run starts from it by path as "
        "it would from CLIP: vision.model=DIR, with vision.train full, frozen, lora or dora.",
        "examples:\n  vlmlab pretrain-vision --out runs/tower\n"
        "  vlmlab train --out runs/sees data.world.generator=scatter vision.model=runs/tower vision.train=frozen",
        saves="the tower", follows="vision section (and data.image_resize)",
        steps=(PRETRAIN_VISION_STEPS, "scenes"), scenes=(PRETRAIN_VISION_SCENES, "scenes drawn to train on"),
        example="data.world.generator=tiles vision.num_layers=3 train.seed=1 (default world: scatter)")
    demo = commands.add_parser(
        "demo", help="a gradio page: ask one or more models about an image, with the evidence beside each answer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serves a page to upload an image (or pick a sample), ask a question or ask for a caption, and "
                    "see each model's answer beside its evidence: the answer with the image blanked and swapped "
                    "for another, its probability with and without the image, a heatmap of where in the image it "
                    "came from. The same as API endpoints /ask and /caption (gradio_client). Needs the demo extra: "
                    'pip install -e ".[demo]".',
        epilog="examples:\n  vlmlab demo --model runs/default                       # http://127.0.0.1:7860\n"
               "  vlmlab demo --model runs/a --model runs/b --port 8080   # two models side by side")
    demo.add_argument("--model", required=True, type=Path, action="append", help="run or model directory (repeat)")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)")
    return parser


def _pretrain_parser(commands, name: str, help_text: str, description: str, epilog: str, *, saves: str,
                     follows: str, steps: tuple[int, str], scenes: tuple[int, str], example: str):
    """The arguments pretrain-lm and pretrain-vision share: --out, --preset, --steps, --scenes and overrides."""
    parser = commands.add_parser(name, help=help_text, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help=f"folder to save {saves} to")
    parser.add_argument("--preset", default="default",
                        help=f"preset whose {follows} it follows (default: default)")
    parser.add_argument("--steps", type=int, default=steps[0],
                        help=f"training steps of 64 {steps[1]} (default {steps[0]})")
    parser.add_argument("--scenes", type=int, default=scenes[0], help=f"{scenes[1]} (default {scenes[0]})")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help=f"e.g. {example}")
    return parser


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _train(args) -> int:
    from vlmlab.config import apply_overrides, merge_config_file
    from vlmlab.presets import EVAL_ONLY, get_preset
    from vlmlab.train import train

    if args.preset in EVAL_ONLY:
        raise ValueError(f"--preset {args.preset} is evaluated as published, not trained: vlmlab eval --model "
                         f"{EVAL_ONLY[args.preset]} (or train --preset instructblip-finetune)")
    if args.resume:
        if args.preset or args.config or args.overrides:
            raise ValueError("--resume continues the run as it was configured: drop --preset, --config and overrides")
        train(None, args.out, resume=True)
        return 0
    cfg = get_preset(args.preset or "default")
    if args.config:
        cfg = merge_config_file(args.config, base=cfg)
    apply_overrides(cfg, args.overrides)
    train(cfg, args.out)
    return 0


def _eval(args) -> int:
    from vlmlab.config import apply_overrides
    from vlmlab.data import load_examples
    from vlmlab.evaluate import evaluate, summary_lines, vqa_results
    from vlmlab.model import VLM

    model = VLM.load(args.model)
    cfg = apply_overrides(model.config, args.overrides)
    spec = args.data or cfg.data.eval
    metrics, records = evaluate(model, load_examples(spec, cfg.eval.split, cfg.data), cfg)
    metrics["data"] = spec
    if args.results:
        args.results.write_text(json.dumps(vqa_results(records)) + "\n")
    for line in summary_lines(metrics):
        print(line, file=sys.stderr)
    text = json.dumps(metrics, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _ask(args) -> int:
    from vlmlab.model import VLM

    model = VLM.load(args.model)
    if args.explain is None:
        print(model.ask(args.image, args.question))
        return 0
    from vlmlab.evidence import explain, overlay

    evidence = explain(model, args.image, args.question, method=args.explain_method)
    print(evidence.answer)
    overlay(evidence.seen, evidence.heatmap).save(args.explain, format="PNG")
    print(f"p(answer | image) = {evidence.probability:.4g}, p(answer | blank image) = "
          f"{evidence.probability_blank:.4g}, blank-image answer: {evidence.answer_blank!r}; {args.explain_method} "
          f"heatmap {evidence.grid[0]}x{evidence.grid[1]} saved to {args.explain}")
    return 0


def _caption(args) -> int:
    from vlmlab.images import ImageError
    from vlmlab.model import VLM

    model = VLM.load(args.model)
    failed = 0
    for image in args.images:  # one at a time: a broken file costs only its own line
        try:
            print(json.dumps({"image": image, "caption": model.caption(image)}), flush=True)
        except ImageError as err:
            failed += 1
            print(json.dumps({"image": image, "error": str(err)}), flush=True)
    return 1 if failed else 0


def _diagnose(args) -> int:
    from vlmlab.config import apply_overrides
    from vlmlab.data import load_examples
    from vlmlab.diagnose import diagnose, read_train_log, report_lines
    from vlmlab.model import VLM

    if args.max_examples < 0:
        raise ValueError(f"--max-examples must be 0 (all) or more, got {args.max_examples}")
    model = VLM.load(args.model)
    cfg = apply_overrides(model.config, args.overrides)
    cfg.eval.max_examples = args.max_examples
    spec = args.data or cfg.data.eval
    run_dir = args.model if (args.model / "train_log.jsonl").is_file() else args.model.parent
    report = diagnose(model, load_examples(spec, cfg.eval.split, cfg.data), cfg,
                      read_train_log(run_dir / "train_log.jsonl"))
    report["data"] = spec
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else "\n".join(report_lines(report)))
    return 0


def _plan(args) -> int:
    from vlmlab.config import apply_overrides, merge_config_file
    from vlmlab.plan import plan, plan_lines
    from vlmlab.presets import get_preset

    cfg = get_preset(args.preset)
    if args.config:
        cfg = merge_config_file(args.config, base=cfg)
    result = plan(apply_overrides(cfg, args.overrides), args.gpu)
    print(json.dumps({"preset": args.preset, **result}, indent=2) if args.json
          else "\n".join(plan_lines(args.preset, result)))
    return 0


def _export(args) -> int:
    import copy
    import shutil

    from vlmlab.card import TRAIN_CONFIG, model_card, reproduce_command, run_metrics
    from vlmlab.model import VLM

    model = VLM.load(args.model, device="cpu")
    trained = copy.deepcopy(model.config)  # as trained: a merge turns a LoRA part's mode into full
    parameters = {name: (sum(p.numel() for p in part.parameters()),
                         sum(p.numel() for p in part.parameters() if p.requires_grad))
                  for name, part in (("vision", model.vision), ("connector", model.connector),
                                     ("language", model.language))}
    merged = model.merge_adapters() if args.merge else []
    if args.format == "transformers":
        from vlmlab.to_transformers import export_llava

        export_llava(model, args.out)
    else:
        model.save(args.out)
    is_run = (args.model / "model" / "config.yaml").is_file()
    metrics = run_metrics(args.model)
    if metrics is not None:
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if is_run:
        shutil.copyfile(args.model / "config.yaml", args.out / TRAIN_CONFIG)
    command = (reproduce_command(args.model) if is_run
               else f"vlmlab train --out runs/{args.out.name} --config config.yaml")
    model_card(args.model, trained, metrics, command, args.push_to_hub or None, parameters, merged,
               args.out).save(args.out / "README.md")
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    merged_text = f", adapters merged into {' and '.join(merged)}" if merged else ""
    print(f"model written to {args.out} ({size / 2**20:.1f} MiB{merged_text}), model card {args.out / 'README.md'}")
    if args.push_to_hub:
        print(f"uploaded to {_push(args.out, args.push_to_hub, args.private)}")
    return 0


def _push(folder: Path, repo_id: str, private: bool) -> str:
    """Uploads `folder` to the hub model repo `repo_id`; any failure (no token, the network, a refusal) is one line."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="vlmlab export")
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"--push-to-hub {repo_id}: the upload failed ({type(err).__name__}: {first})") from err
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


def _bench(args) -> int:
    from vlmlab.bench import report_lines, run_bench
    from vlmlab.config import apply_overrides
    from vlmlab.presets import get_preset

    result = run_bench(apply_overrides(get_preset(args.preset), args.overrides), args.steps, args.epochs,
                       args.cpu_time, args.questions_per_image)
    print(json.dumps(result, indent=2) if args.json else "\n".join(report_lines(result, args.preset)))
    return 0


def _sweep(args) -> int:
    from vlmlab.report import summary_table, write_report
    from vlmlab.study import find_study, load_study, shipped_studies
    from vlmlab.sweep import estimate, plan_lines, plan_runs, run_study

    if args.list:
        studies = shipped_studies()
        width = max(map(len, studies), default=0)
        print("\n".join(f"{name:<{width}}  {text}" for name, text in studies.items()))
        return 0
    if not args.study or not args.out:
        raise ValueError("vlmlab sweep needs a STUDY file (or a shipped study's name) and --out DIR; --list "
                         "names the shipped studies")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be 1 or more, got {args.jobs}")
    study = load_study(find_study(args.study), args.scale)
    runs = plan_runs(study, args.out)
    if args.plan:
        print("\n".join(plan_lines(study, estimate(study, runs, args.out, args.gpu), args.jobs)))
        return 0
    if not args.report:
        options = {"partition": args.partition, "time": args.time, "gpus": args.gpus, "cpus": args.cpus}
        run_study(study, args.out, args.jobs, args.launcher, options, runs)
    summary = write_report(args.out)
    print("\n".join(summary_table(summary)))
    print(f"report: {args.out / 'report.md'}")
    return 1 if any(variant["failed"] for variant in summary["variants"].values()) else 0


def _report(args) -> int:
    from vlmlab.run_report import write_run_report

    print(f"report: {write_run_report(args.run)}")
    return 0


def _presets(args) -> int:
    from vlmlab.presets import describe_presets

    print("\n".join(describe_presets()))
    return 0


def _pretrain_lm(args) -> int:
    import time

    from vlmlab.config import apply_overrides
    from vlmlab.pretrain import pretrain_lm
    from vlmlab.presets import get_preset

    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    if args.family:
        cfg.language.family = args.family
    began = time.perf_counter()
    recipe = pretrain_lm(cfg, args.out, args.steps, args.scenes)
    corpus = recipe["corpus"]
    print(f"tiny {cfg.language.family} LM trained {recipe['steps']} steps on {corpus['pairs']} text pairs "
          f"({corpus['facts']} facts, {corpus['sentences']} sentences, {corpus['scenes']} captions) in "
          f"{time.perf_counter() - began:.0f} s: last loss {recipe['last_loss']:.3f}, answers "
          f"{recipe['fact_accuracy']:.0%} of the facts")
    print(f"saved to {args.out}; start a run from it: vlmlab train --out runs/NAME "
          f"data.world.generator={corpus['generator']} language.model={args.out}")
    return 0


def _pretrain_vision(args) -> int:
    import time

    from vlmlab.config import apply_overrides
    from vlmlab.presets import get_preset
    from vlmlab.pretrain_vision import pretrain_vision

    cfg = get_preset(args.preset)
    if cfg.data.world.generator == "v1":  # the default world has no use for it: world v2 unless told otherwise
        cfg.data.world.generator = "scatter"
    apply_overrides(cfg, args.overrides)
    began = time.perf_counter()
    recipe = pretrain_vision(cfg, args.out, args.steps, args.scenes)
    print(f"tiny {cfg.vision.family} tower trained {recipe['steps']} steps on {recipe['scenes']['train']} "
          f"{recipe['scenes']['generator']} scenes in {time.perf_counter() - began:.0f} s: on "
          f"{recipe['scenes']['held_out']} held-out scenes {recipe['label_accuracy']:.1%} of the (colour, shape) "
          f"labels right (always 'absent': {recipe['label_base_rate']:.1%}), every label right for "
          f"{recipe['exact_set_accuracy']:.0%} of the scenes")
    print(f"saved to {args.out}; start a run from it: vlmlab train --out runs/NAME "
          f"data.world.generator={recipe['scenes']['generator']} vision.model={args.out}")
    return 0


def _demo(args) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the demo needs gradio: pip install -e ".[demo]"', file=sys.stderr)
        return 2
    from vlmlab.demo import build_app, launch
    from vlmlab.model import VLM

    names = []
    for path in args.model:  # the folder's name, or its parent's for a run's model/ folder; numbered if repeated
        name = path.resolve().parent.name if path.resolve().name == "model" else path.resolve().name
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    launch(build_app([VLM.load(path) for path in args.model], names), args.host, args.port)
    return 0


COMMANDS = {"train": _train, "eval": _eval, "ask": _ask, "caption": _caption, "diagnose": _diagnose,
            "presets": _presets, "plan": _plan, "export": _export, "bench": _bench, "sweep": _sweep,
            "report": _report, "demo": _demo, "pretrain-lm": _pretrain_lm,
            "pretrain-vision": _pretrain_vision}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from vlmlab.config import ConfigError
    from vlmlab.data.jsonl import DatasetError
    from vlmlab.faults import TrainingFault
    from vlmlab.images import ImageError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, ImageError, OSError, ValueError, TrainingFault) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
