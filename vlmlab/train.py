"""Training: AdamW with warmup + cosine decay, gradient accumulation and clipping, mixed precision on GPU,
periodic evaluation with the shuffled-image control, checkpoints that `--resume` continues exactly.

A run directory holds `config.yaml`, `train_log.jsonl`, `checkpoint/` (the latest resumable state),
`model/` (the final model), `metrics.json` and `predictions.jsonl`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
import random
import time
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vlmlab.config import Config, ConfigError, load_config, save_config, validate
from vlmlab.costs import environment, run_costs
from vlmlab.data import load_examples
from vlmlab.data.batching import StepBatches, image_groups, with_draw_seeds
from vlmlab.diagnose import ConditioningAlarm
from vlmlab.distributed import end_processes, start_processes
from vlmlab.evaluate import evaluate, summary_lines
from vlmlab.feature_cache import cache_root, training_data
from vlmlab.images import views_read
from vlmlab.faults import (FaultGuard, TrainingFault, fresh_partial, recover_directory, replace_directory,
                           truncate_log, write_text_atomically)
from vlmlab.log import info, warn
from vlmlab.model import VLM, build_vlm, describe_parts, start_from
from vlmlab.parking import park_if_cached
from vlmlab.pretrain import pretrained_language
from vlmlab.prompts import training_texts
from vlmlab.registry import lookup
from vlmlab.tracking import Trackers, require
from vlmlab.tuning import enable_gradient_checkpointing
from vlmlab.weights import record as record_weights

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts (no ndarrays)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto`: bf16 where the GPU has it, else fp16; fp32 on CPU."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.type == "cuda")


def _adamw_8bit(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with 8-bit moment estimates (bitsandbytes): 2 bytes of state per trained weight instead of 8."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("train.optimizer=adamw8bit needs the bitsandbytes package (pip install bitsandbytes, "
                          "on a CUDA GPU); or use train.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.98))


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw_8bit}


def make_optimizer(model: VLM, cfg: Config) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and learned query vectors' 1-d parameters.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return lookup(OPTIMIZERS, cfg.train.optimizer, "train.optimizer")(groups, cfg.train.lr, model.device)


def save_checkpoint(out_dir: Path, model: VLM, optimizer, scheduler, scaler, step: int, seen: dict) -> None:
    """Writes the resumable state into a temporary folder, then swaps it in: a kill never leaves half of one.
    `seen`: examples and answer tokens trained on up to `step`, so a resumed run's costs count the whole run."""
    final = out_dir / CHECKPOINT_DIR
    partial = fresh_partial(final)
    model.save(partial / "model")
    state = {
        "step": step,
        "seen": seen,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    torch.save(state, partial / STATE_FILE)
    replace_directory(final)


def load_checkpoint(out_dir: Path, device: torch.device) -> tuple[VLM, dict]:
    folder = out_dir / CHECKPOINT_DIR
    recover_directory(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{out_dir}: nothing to resume (no {CHECKPOINT_DIR}/{STATE_FILE})")
    model = VLM.load(folder / "model", device=str(device)).train()
    try:  # weights_only: tensors and plain values only, so a tampered file cannot run code when unpickled
        state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{folder / STATE_FILE}: refused, it holds more than tensors and plain values "
                         f"({str(err).splitlines()[0]})") from None
    return model, state


def append_log(path: Path, record: dict) -> None:
    with path.open("a") as log:
        log.write(json.dumps(record) + "\n")


def train(cfg: Config | None, out_dir: str | Path, resume: bool = False) -> dict:
    """Trains `cfg` into `out_dir`; with `resume`, continues the run in `out_dir` as it was configured."""
    trackers = Trackers()  # train.report_to's, opened once the config is saved; closed however the run ends
    failed = True
    try:
        metrics, failed = _train(cfg, out_dir, resume, trackers), False
        end_processes(together=False)
        return metrics
    except TrainingFault:  # raised by every process at the same step (FaultGuard decides on what all saw)
        end_processes(together=True)
        raise
    finally:
        trackers.close(failed)


def _train(cfg: Config | None, out_dir: str | Path, resume: bool, trackers: Trackers) -> dict:
    out_dir = Path(out_dir)
    if resume:
        if not (out_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{out_dir}: nothing to resume (no config.yaml)")
        cfg = load_config(out_dir / "config.yaml")
    validate(cfg)
    require(cfg.train.report_to)  # a tracker's missing package: one line, before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = start_processes(cfg.train.device)  # this one, or one of several under `accelerate launch`
    device = processes.device
    seed_everything(cfg.train.seed)

    train_examples = load_examples(cfg.data.train, "train", cfg.data)
    val_examples = load_examples(cfg.data.eval, "val", cfg.data)
    if resume:
        model, state = load_checkpoint(out_dir, device)
    else:
        if cfg.train.init_from:  # a saved model's architecture and weights; this run's data and training
            model = start_from(cfg.train.init_from, cfg)
            cfg = model.config
        else:
            if cfg.language.pretrain_steps:  # a tiny LM that knows the caption language, loaded by path: the
                cfg = copy.deepcopy(cfg)  # saved config names its folder, whose recipe.json says how it was made
                cfg.language.model = str(pretrained_language(cfg, cache_root(cfg, out_dir)).resolve())
                cfg.language.pretrain_steps = 0
            model = build_vlm(cfg, training_texts(train_examples, cfg.data))
        model, state = model.to(device), None
        if processes.is_main:
            record_weights(cfg)  # what each pretrained part's name resolved to: in config.yaml, the model, metrics
            save_config(cfg, out_dir / "config.yaml")
            (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    tc = cfg.train
    if processes.is_main:
        trackers.open(out_dir, cfg)
    for line in describe_parts(model):
        info(line)
    if tc.gradient_checkpointing:
        checkpointed = enable_gradient_checkpointing([model.vision, model.language])
        info(f"gradient checkpointing: {', '.join(checkpointed) or 'no trained transformers part to apply it to'}")
    if tc.compile:  # compiled in place: parameter names, saving and loading stay as they are
        for part in (model.vision.model, model.connector, model.language.model):
            part.compile()

    amp_dtype = resolve_precision(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        info(f"resuming at step {start_step} of {tc.max_steps}")
        if processes.is_main:  # the steps after the checkpoint are run again
            truncate_log(out_dir / "train_log.jsonl", start_step)
        processes.barrier()  # every process reads the log cut back (FaultGuard.resume)

    micro_batch = tc.batch_size // tc.grad_accum
    sampler = StepBatches(image_groups(train_examples), micro_batch, tc.seed, start_step=start_step * tc.grad_accum)
    planned = islice(sampler, (tc.max_steps - start_step) * tc.grad_accum)
    dataset, collate_fn = training_data(model, train_examples, cfg, out_dir, planned, amp_dtype, processes)
    drawn = with_draw_seeds(processes.shard(sampler), tc.seed, start_step * tc.grad_accum)  # same in any worker
    loader = iter(DataLoader(dataset, batch_sampler=drawn, collate_fn=collate_fn,
                             num_workers=tc.num_workers, pin_memory=device.type == "cuda"))
    if state is not None:  # after the loader: starting it draws a seed from torch's RNG, as it did in the first run
        set_rng_state(state["rng"])
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext())
    val_cfg = copy.deepcopy(cfg)
    val_cfg.eval.max_examples, val_cfg.eval.caption_metrics = tc.eval_examples, False
    alarm = ConditioningAlarm(cfg, val_examples, model.vision.image_size)  # warns when the image stops mattering

    log_path = out_dir / "train_log.jsonl"

    def log(record: dict) -> None:
        if processes.is_main:  # one log, however many processes
            append_log(log_path, record)
            trackers.log(record)

    guard = FaultGuard(tc.max_bad_steps, micro_batch, tc.grad_accum, model.language.answer_tokens, log,
                       gather=processes.gather, is_main=processes.is_main)  # several processes cut alike
    guard.resume(log_path, start_step)

    forward = processes.share(model)  # every process starts from the main one's weights
    # After every weight was shared: the tower is parked while steps read the cache, back for what runs it.
    parking = park_if_cached(model, dataset, tc.park_tower)
    tower_present = parking.unparked if parking else contextlib.nullcontext

    def backward(batch: dict, share: float) -> float:
        """Forward and backward of a micro-batch, or of a piece of one holding `share` of its loss."""
        with autocast:
            views = views_read(batch["image_keys"], cfg.data, cfg.data.image_split_fraction)  # None: every view
            loss = forward(batch.get("pixels"), batch["prompts"], batch["targets"], batch["image_index"],
                           features=batch.get("features"), views=views) * share * batch["loss_weight"][0]
            loss = loss / tc.grad_accum
        scaler.scale(loss).backward()
        return loss.item()

    model.train()
    started, samples, answer_tokens, window_loss, window_steps = time.perf_counter(), 0, 0, 0.0, 0
    seen_before = state.get("seen", {}) if state else {}  # a checkpoint written before costs were kept has none

    def seen() -> dict:
        return {"examples_seen": seen_before.get("examples_seen", 0) + samples,
                "answer_tokens_seen": seen_before.get("answer_tokens_seen", 0) + answer_tokens}
    bar = tqdm(range(start_step, tc.max_steps), initial=start_step, total=tc.max_steps, desc="train",
               disable=None if processes.is_main else True)
    for step in bar:
        micro_batches = []
        for _ in range(tc.grad_accum):
            batch = next(loader)
            while batch is None:  # every image of this micro-batch was unusable (already reported)
                batch = next(loader)
            micro_batches.append(batch)
        step_samples, step_tokens = processes.weigh(micro_batches, model.language.answer_tokens)  # all processes
        samples, answer_tokens = samples + step_samples, answer_tokens + step_tokens
        step_loss = processes.mean(guard.accumulate(step + 1, micro_batches, backward, optimizer))
        processes.average_gradients(model.parameters())  # once all processes' passes fit (distributed.py)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        applied = guard.step_is_finite(step + 1, step_loss, grad_norm)
        if applied:
            scaler.step(optimizer)
        scaler.update()  # a skipped step with an active fp16 scaler lowers its scale (unscale_ saw the inf)
        with warnings.catch_warnings():  # a skipped step counts in the schedule too: no warning that it came first
            if not applied:
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            scheduler.step()
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        done = step + 1
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{step_loss:.3f}", samples_s=f"{samples / elapsed:.0f}")
        if done % tc.log_every == 0 or done == tc.max_steps:
            log({"step": done, "loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                 "grad_norm": float(grad_norm), "samples_per_second": samples / elapsed, "elapsed_seconds": elapsed})
            window_loss, window_steps = 0.0, 0
        if processes.is_main and tc.eval_every and done % tc.eval_every == 0 and done < tc.max_steps:
            with tower_present():
                metrics, _ = evaluate(model, val_examples, val_cfg)
            log({"step": done, "eval": metrics})
            info(f"step {done}: val VQA accuracy {metrics['vqa_accuracy']}, "
                 f"shuffled images {metrics.get('vqa_accuracy_shuffled_images')}")
        if processes.is_main and alarm.due(done):
            with tower_present():
                log({"step": done, "conditioning": alarm.check(model, done)})
        if processes.is_main and tc.save_every and done % tc.save_every == 0 and done < tc.max_steps:
            with tower_present():
                save_checkpoint(out_dir, model, optimizer, scheduler, scaler, done, seen())
    bar.close()
    if parking:
        parking.unpark()
    train_seconds = time.perf_counter() - started
    if not processes.is_main:
        return {}  # the main process saves, evaluates and reports

    save_checkpoint(out_dir, model, optimizer, scheduler, scaler, tc.max_steps, seen())
    model.save(fresh_partial(out_dir / "model"))
    replace_directory(out_dir / "model")
    test_examples = load_examples(cfg.data.eval, cfg.eval.split, cfg.data)
    metrics, records = evaluate(model, test_examples, cfg)
    metrics["train_seconds"] = train_seconds
    metrics["train_samples_per_second"] = samples / train_seconds if train_seconds > 0 else None
    metrics["train_steps"] = tc.max_steps
    metrics.update(run_costs(model, **seen(), device=device))
    metrics["environment"] = environment()
    metrics["failed_train_images"] = len(dataset.failed)
    metrics.update(guard.counts())
    write_text_atomically(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    trackers.log({"step": tc.max_steps, "test": metrics})  # with their shuffled controls
    with (out_dir / "predictions.jsonl").open("w") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)
    for line in [*summary_lines(metrics), *guard.report()]:
        print(line)
    print(f"model, metrics and log written to {out_dir}")
    try:  # a report only shows the run: failing to draw it (or to import matplotlib) must not lose the run
        from vlmlab.run_report import write_run_report

        print(f"report: {write_run_report(out_dir, test_examples)}")
        drawn = True
    except Exception as err:  # noqa: BLE001
        drawn = False
        warn(f"run report not written: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1]}")
    if drawn and (out_dir / "report" / "samples.png").is_file():  # not a grid an earlier run left
        trackers.image("report/samples", out_dir / "report" / "samples.png", tc.max_steps)
    return metrics
