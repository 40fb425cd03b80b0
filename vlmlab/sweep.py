"""`vlmlab sweep STUDY --out DIR`: every (variant, seed) of a study as an ordinary `vlmlab train` run in
`DIR/runs/VARIANT/seedK/`, then the report (report.py).

- A run's own `sweep_run.json` records the resolved config it was started with, its status and its error line.
  Run again, the sweep skips a finished run with the same config, resumes an interrupted one from its checkpoint,
  and refuses one whose config has changed since (naming the run and the fields) rather than reuse it silently.
- Runs go in dependency order (`train.init_from=@VARIANT` waits for that variant's run of the same seed); a run
  that fails is recorded with its one-line error and the others go on (those starting from it fail too, saying so).
- Each run is a process of its own (`python -m vlmlab train ...`, the exact command the report prints), so its peak
  memory and its threads are its own: `--jobs N` runs N at once with the CPU cores split between them, or one GPU
  each. `--launcher slurm` hands the same commands to submitit on a SLURM cluster; `submitit-local` runs them
  through submitit's local executor, the same path on one machine.
- Every run writes its tower features to one cache under DIR: runs with the same frozen tower and image
  preparation compute them once.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from vlmlab.faults import write_text_atomically
from vlmlab.log import info, warn
from vlmlab.registry import lookup
from vlmlab.study import (PREPARED, Study, StudyError, config_changes, config_fields, prepared_dir, study_argument,
                          with_sweep_settings)

RUN_RECORD = "sweep_run.json"
LEDGER = "ledger.json"


@dataclass
class Run:
    variant: str
    seed: int
    directory: Path
    command: list[str]  # the `vlmlab train` command line, as run and as the report prints it
    fields: dict  # the resolved config, `section.field -> value` (study.config_fields)
    starts_from: str | None  # the key of the run this one waits for
    state: str = "new"  # new | resume | done, read from its folder

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"


def plan_runs(study: Study, out: Path) -> list[Run]:
    """The study's runs in the order they can start, each with its state read from its folder."""
    runs = []
    for variant in study.variants().values():
        for seed in study.seeds:
            cfg, overrides = study.run_config(variant, seed)
            directory = out / "runs" / variant.name / f"seed{seed}"
            command = [sys.executable, "-m", "vlmlab", "train", "--out", str(directory), *study.source_args(),
                       *with_sweep_settings(overrides, out, seed, out / "runs")]
            source = f"{variant.starts_from}/seed{seed}" if variant.starts_from else None
            run = Run(variant.name, seed, directory, command, config_fields(cfg), source)
            run.state = _state(run)
            runs.append(run)
    return runs


def _state(run: Run) -> str:
    """done (finished with this config) | resume (a checkpoint of this config) | new; a finished or started run
    whose config has changed since is an error, never reused."""
    record_path = run.directory / RUN_RECORD
    if not record_path.is_file():
        if (run.directory / "config.yaml").is_file():
            raise StudyError(f"{run.directory} holds a run the sweep did not start; move it away or use another --out")
        return "new"
    record = json.loads(record_path.read_text())
    changes = config_changes(record["config"], run.fields)
    if changes:
        raise StudyError(f"run {run.key} was {'trained' if record['status'] == 'done' else 'started'} with another "
                         f"config than the study now gives it ({'; '.join(changes[:3])}); remove {run.directory} to "
                         "train it again, or restore the study")
    if record["status"] == "done" and (run.directory / "metrics.json").is_file():
        return "done"
    return "resume" if (run.directory / "checkpoint" / "trainer_state.pt").is_file() else "new"


def display(command: list[str]) -> str:
    """A command as a person types it: `vlmlab ...` instead of this interpreter's `-m vlmlab`."""
    words = command[3:] if command[:3] == [sys.executable, "-m", "vlmlab"] else command
    return shlex.join(["vlmlab", *words])


# -- running one (in a process of its own) ---------------------------------------------------------------------
def execute(commands: list[list[str]], log_path: str, env: dict) -> str | None:
    """Runs the commands one after the other, their output appended to `log_path`; returns None, or the failed
    command's one-line error (the `error: ...` line vlmlab ends with, else its last line of output). A plain
    module-level function, so that submitit can pickle it for a cluster job."""
    with open(log_path, "a") as log:
        for command in commands:
            log.write(f"$ {display(command)}\n")
            log.flush()
            start = log.tell()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if done.returncode:
                with open(log_path) as written:  # this command's output only, not an earlier try's
                    written.seek(start)
                    lines = [line for line in written.read().splitlines() if line.strip()]
                errors = [line for line in lines if line.startswith("error:")]
                return (errors or lines or [f"exit {done.returncode}"])[-1][:500]
    return None


def run_commands(run: Run, study: Study) -> list[list[str]]:
    """`vlmlab train` (or `--resume` from the run's checkpoint), then `vlmlab diagnose` if the study asks."""
    train = run.command if run.state == "new" else [*run.command[:6], "--resume"]
    diagnose = [sys.executable, "-m", "vlmlab", "diagnose", "--model", str(run.directory), "--json",
                "--out", str(run.directory / "diagnose.json")]
    return [train, *([diagnose] if study.diagnose else [])]


def _run_one(run: Run, study: Study, slot: int, submit) -> str | None:
    """Trains (or resumes) one run and records the outcome in its folder."""
    run.directory.mkdir(parents=True, exist_ok=True)
    if run.state == "new":  # a fresh start: what a failed earlier try left would be read as this run's
        for name in ("metrics.json", "diagnose.json", "sweep.log"):
            (run.directory / name).unlink(missing_ok=True)
    _record(run, "running", None, None)
    started = time.perf_counter()
    error = submit(run_commands(run, study), str(run.directory / "sweep.log"), slot)
    _record(run, "failed" if error else "done", error, time.perf_counter() - started)
    return error


def _record(run: Run, status: str, error: str | None, seconds: float | None) -> None:
    record = {"variant": run.variant, "seed": run.seed, "status": status, "error": error, "seconds": seconds,
              "command": display(run.command), "config": run.fields}
    write_text_atomically(run.directory / RUN_RECORD, json.dumps(record, indent=2) + "\n")


# -- launchers: where the commands of a run execute -------------------------------------------------------------
def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local(jobs: int, options: dict):
    """Processes on this machine: the CPU cores split between the runs at once (N x threads <= cores), or one GPU
    each where there are as many."""
    cores, gpus = os.cpu_count() or 1, _gpu_count()
    threads = max(1, cores // jobs)
    if jobs > max(cores, gpus):
        warn(f"--jobs {jobs} runs more trainings at once than this machine has cores ({cores}) or GPUs ({gpus}): "
             "they will slow each other down")

    def submit(commands, log_path, slot):
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
        if gpus >= jobs > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        return execute(commands, log_path, env)

    return submit


def _submitit(cluster: str):
    """submitit's executor for `cluster` (slurm, or local: the same path on this machine), a job per run."""

    def launcher(jobs: int, options: dict):
        import submitit

        executor = submitit.AutoExecutor(folder=options["folder"], cluster=cluster)
        executor.update_parameters(timeout_min=options["time"], cpus_per_task=options["cpus"])
        if cluster == "slurm":
            executor.update_parameters(slurm_partition=options["partition"], gpus_per_node=options["gpus"])

        def submit(commands, log_path, slot):
            env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(options["cpus"])}
            job = executor.submit(execute, commands, log_path, env)
            try:
                return job.result()
            except Exception as err:  # the job itself died (time limit, node failure): this run fails, not the sweep
                reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                return f"error: {cluster} job {job.job_id} failed: {reason.strip()[:300]}"

        return submit

    return launcher


LAUNCHERS = {"local": _local, "submitit-local": _submitit("local"), "slurm": _submitit("slurm")}
CLUSTER_DEFAULTS = {"partition": None, "time": 60, "gpus": 1, "cpus": 1}  # time in minutes, per run


# -- prepared parts: made once, before the runs that load them ---------------------------------------------------
def prepare_state(study: Study, out: Path, name: str) -> str:
    """done (made by this command) | new; a part made by another command than the study now gives is an error."""
    record_path = prepared_dir(out, name).with_suffix(".json")
    if not record_path.is_file():
        return "new"
    record = json.loads(record_path.read_text())
    command = display(_vlmlab(study.prepare_command(name, out)))
    if record["command"] != command:
        raise StudyError(f"prepared part {name} was made by `{record['command']}`, the study now says `{command}`; "
                         f"remove {prepared_dir(out, name)} and {record_path} to make it again, or restore the study")
    return "done" if record["status"] == "done" else "new"


def _vlmlab(words: list[str]) -> list[str]:
    return [sys.executable, "-m", "vlmlab", *words]


def _prepare_one(study: Study, out: Path, name: str, slot: int, submit) -> str | None:
    """Makes one prepared part into DIR/prepared/NAME; records its command and outcome beside it (NAME.json)."""
    folder = prepared_dir(out, name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = _vlmlab(study.prepare_command(name, out))
    started = time.perf_counter()
    error = submit([command], str(folder.with_suffix(".log")), slot)
    record = {"command": display(command), "status": "failed" if error else "done", "error": error,
              "seconds": time.perf_counter() - started}
    write_text_atomically(folder.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return error


def uses(run: Run, folder: Path) -> bool:
    return any(str(folder) in word for word in run.command)


def run_study(study: Study, out: Path, jobs: int = 1, launcher: str = "local", options: dict | None = None,
              runs: list[Run] | None = None) -> dict[str, str | None]:
    """Makes the prepared parts not made yet, then runs what is not done yet, `jobs` at a time, each after the run
    it starts from; writes the ledger as runs end. Returns {run key: error line or None} of the runs it started."""
    runs = runs if runs is not None else plan_runs(study, out)
    options = {**CLUSTER_DEFAULTS, "folder": str(out / "submitit"), **(options or {})}
    submit = lookup(LAUNCHERS, launcher, "launcher")(jobs, options)
    write_ledger(study, out, runs)
    pending = [run for run in runs if run.state != "done"]
    total, outcomes, failed = len(pending), {}, set()
    to_prepare = [name for name in study.prepare if prepare_state(study, out, name) != "done"
                  and any(uses(run, prepared_dir(out, name)) for run in pending)]
    if to_prepare:
        info(f"sweep {study.name}: preparing {', '.join(to_prepare)} (into {out / 'prepared'})")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            errors = dict(zip(to_prepare, pool.map(lambda item: _prepare_one(study, out, item[1], item[0] % jobs,
                                                                             submit), enumerate(to_prepare))))
        for name, error in errors.items():
            info(f"prepared {name}: " + (f"failed: {error}" if error else "done"))
            if error:  # the runs that load it fail without running, saying so
                for run in [r for r in pending if uses(r, prepared_dir(out, name))]:
                    pending.remove(run)
                    run.directory.mkdir(parents=True, exist_ok=True)
                    _record(run, "failed", f"its prepared part {name} failed: {error}", 0.0)
                    outcomes[run.key] = f"its prepared part {name} failed"
                    failed.add(run.key)
    info(f"sweep {study.name}: {len(runs)} runs, {len(runs) - total} already done, {total} to run, {jobs} at a time")

    def finish(run: Run, error: str | None) -> None:
        outcomes[run.key] = error
        if error:
            failed.add(run.key)
        info(f"[{len(outcomes)}/{total}] {progress_line(run, error)}")
        write_ledger(study, out, runs)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        active: dict = {}  # future -> (run, slot)
        while pending or active:
            for run in list(pending):
                unfinished = {r.key for r in pending} | {r.key for r, _ in active.values()}
                if run.starts_from in failed:  # nothing to start from: fails without running
                    pending.remove(run)
                    run.directory.mkdir(parents=True, exist_ok=True)
                    _record(run, "failed", f"its starting model {run.starts_from} failed", 0.0)
                    finish(run, f"its starting model {run.starts_from} failed")
                elif len(active) < jobs and run.starts_from not in unfinished:
                    pending.remove(run)
                    slot = min(set(range(jobs)) - {s for _, s in active.values()})
                    active[pool.submit(_run_one, run, study, slot, submit)] = (run, slot)
            if active:
                done, _ = wait(active, return_when=FIRST_COMPLETED)
                for future in done:
                    run, _ = active.pop(future)
                    finish(run, future.result())
    return outcomes


def progress_line(run: Run, error: str | None) -> str:
    """variant, seed, main metric and time of a finished run."""
    record = json.loads((run.directory / RUN_RECORD).read_text())
    head = f"{run.variant} seed {run.seed}: "
    if error:
        return head + f"failed after {record['seconds']:.0f} s: {error}"
    metrics = json.loads((run.directory / "metrics.json").read_text())
    if metrics.get("vqa_accuracy") is not None:
        score = (f"VQA accuracy {metrics['vqa_accuracy']:.3f} "
                 f"(shuffled images {_number(metrics.get('vqa_accuracy_shuffled_images'))})")
    elif metrics.get("caption"):
        score = f"CIDEr {metrics['caption']['CIDEr']:.3f}"
    else:
        score = f"empty outputs {_number(metrics.get('empty_output_rate'))}"
    diagnosis = run.directory / "diagnose.json"
    if diagnosis.is_file():
        score += f", {json.loads(diagnosis.read_text())['verdict']}"
    return head + f"{score}, {record['seconds']:.0f} s"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_ledger(study: Study, out: Path, runs: list[Run]) -> None:
    """DIR/ledger.json: the study and every run's recorded state, what report.py reads."""
    entries = {}
    for run in runs:
        path = run.directory / RUN_RECORD
        record = json.loads(path.read_text()) if path.is_file() else {"status": "pending", "error": None,
                                                                       "seconds": None}
        entries[run.key] = {"variant": run.variant, "seed": run.seed,
                            "dir": run.directory.relative_to(out).as_posix(), "status": record["status"],
                            "error": record["error"], "seconds": record["seconds"], "command": display(run.command)}
    variants = {name: {"overrides": variant.overrides, "levels": variant.levels}
                for name, variant in study.variants().items()}
    prepared = {name: display(_vlmlab(study.prepare_command(name, out))) for name in study.prepare}
    ledger = {"name": study.name, "design": study.design, "seeds": study.seeds, "reference": study.reference,
              "study": study_argument(study.path), "scale": study.scale, "not_at_this_scale": study.absent,
              "prepared": prepared, "variants": variants, "runs": entries}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / LEDGER, json.dumps(ledger, indent=2) + "\n")


# -- --plan: the runs, their order, and what they will take ------------------------------------------------------
# The offline default's measured rate on a 2-core CPU (README): 242 examples/s at 1.57M parameters, ~25 s of
# evaluation. Until a run of the sweep has finished, tiny runs are estimated from it, scaled by parameters.
REFERENCE_RATE, REFERENCE_PARAMETERS, EVAL_SECONDS = 242.0, 1.57e6, 25.0
COLAB_SESSION_HOURS = 12


def is_tiny(cfg) -> bool:
    """Parts built from scratch or loaded from a local folder (a prepared part): cheap to build for real, and
    trained at about the offline default's rate."""
    return all(not part.model or Path(part.model).is_dir() for part in (cfg.vision, cfg.language))


def with_prepared(cfg, study: Study, out: Path):
    """`cfg` with `@prepared/NAME` in vision.model and language.model replaced by the part's folder, or None while
    one of them is not made yet (its size is not known before)."""
    for part in (cfg.vision, cfg.language):
        found = PREPARED.fullmatch(part.model)
        if found:
            folder = prepared_dir(out, found[1])
            if not (folder / "config.json").is_file():
                return None
            part.model = str(folder)
    return cfg


def _parameters(cfg, built: dict) -> tuple[int, int, int, int]:
    """(total, trainable, saved, feature floats per image) of the config's model, built once per architecture:
    tiny parts for real (small), pretrained ones at their real shapes on the meta device (nothing downloaded).
    `saved` leaves out the frozen weights of a part saved by reference (a named checkpoint, frozen or with an
    adapter): a run folder holds only its name and adapter."""
    from vlmlab.model import build_vlm
    from vlmlab.plan import build_from_architecture
    from vlmlab.tuning import saved_by_reference

    key = json.dumps([cfg.to_dict()[part] for part in ("vision", "connector", "language")] + [cfg.data.image_split],
                     sort_keys=True)
    if key not in built:
        tiny = is_tiny(cfg)
        model = build_vlm(cfg, ["a short caption: question answer"]) if tiny else build_from_architecture(cfg)
        num_features, width, _ = model.vision.feature_layout() if tiny else (0, 0, None)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        by_reference = sum(p.numel() for part in ("vision", "language") if saved_by_reference(getattr(cfg, part))
                           for p in getattr(model, part).parameters() if not p.requires_grad)
        built[key] = (total, trainable, total - by_reference, num_features * width)
    return built[key]


def estimate(study: Study, runs: list[Run], out: Path, gpu: str = "t4") -> list[dict]:
    """Per run: examples to train on, parameters, seconds and bytes expected; measured where the run is done, from
    done runs of the sweep (seconds per example) where there are some, else from REFERENCE_RATE (tiny parts) or
    from `vlmlab plan`'s FLOP count on `gpu` (pretrained parts)."""
    done = [json.loads((r.directory / RUN_RECORD).read_text()) | {"run": r} for r in runs if r.state == "done"]
    built: dict = {}
    planned: dict = {}
    rows = []
    variants = study.variants()
    for run in runs:
        cfg = with_prepared(study.run_config(variants[run.variant], run.seed)[0], study, out)
        if cfg is None:  # a prepared part not made yet: its size is known once it is
            rows.append({"run": run.key, "state": run.state, "after": run.starts_from, "examples": None,
                         "parameters": None, "trainable": None, "bytes": 0, "cache_bytes": 0, "seconds": None,
                         "source": ""})
            continue
        examples = cfg.train.max_steps * cfg.train.batch_size
        total, trainable, saved, features = _parameters(cfg, built)
        row = {"run": run.key, "state": run.state, "after": run.starts_from, "examples": examples,
               "parameters": total, "trainable": trainable,
               # model/ and checkpoint/model in fp32, AdamW's two moments per trained weight in the checkpoint
               "bytes": 4 * saved * 2 + 8 * trainable, "cache_bytes": 0, "seconds": None, "source": ""}
        if cfg.data.train == "synthetic" and features and cfg.vision.train == "frozen":
            row["cache_bytes"] = 2 * features * (cfg.data.train_images + 2 * cfg.data.eval_images)  # fp16
        same = [d for d in done if d["variant"] == run.variant]
        if run.state == "done":
            row["seconds"], row["source"] = next(d["seconds"] for d in done if d["run"] is run), "measured"
        elif done:
            per_example = sum(d["seconds"] / _examples(d["run"]) for d in same or done) / len(same or done)
            row["seconds"], row["source"] = per_example * examples, "from finished runs"
        elif is_tiny(cfg):
            seconds = examples / REFERENCE_RATE * total / REFERENCE_PARAMETERS + EVAL_SECONDS
            row["seconds"], row["source"] = seconds, "rough: the offline default's 2-core rate"
        else:
            row["seconds"], row["source"] = _gpu_seconds(cfg, gpu, planned), f"GPU time on one {gpu}, from plan"
        rows.append(row)
    return rows


def _gpu_seconds(cfg, gpu: str, planned: dict) -> float:
    """Training seconds of `cfg` on `gpu` by `vlmlab plan` (its FLOPs at the proposal), one plan per config
    that differs in more than seed and steps."""
    from vlmlab.plan import plan, training_hours

    fields = {key: value for key, value in config_fields(cfg).items() if key not in ("train.seed", "train.max_steps")}
    key = json.dumps(fields, sort_keys=True, default=str)
    if key not in planned:
        planned[key] = plan(cfg, gpu)
    return training_hours(planned[key]["flops"], cfg, gpu) * 3600


def _examples(run: Run) -> int:
    metrics = json.loads((run.directory / "metrics.json").read_text())
    return metrics.get("train_examples_seen") or metrics.get("train_steps", 1)


def _millions(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.2f}M"


def plan_lines(study: Study, rows: list[dict], jobs: int) -> list[str]:
    width = max(len(row["run"]) for row in rows)
    lines = [f"study {study.name} ({study.design}, seeds {', '.join(map(str, study.seeds))}): {len(rows)} runs, "
             f"in this order", f"{'run':<{width}}  {'state':<7} {'examples':>9} {'params':>8} {'trained':>8} "
             f"{'minutes':>8}  starts from"]
    lines[1:1] = [f"made first, once: {name} (vlmlab {shlex.join(words)})" for name, words in study.prepare.items()]
    for row in rows:
        minutes = "?" if row["seconds"] is None else f"{row['seconds'] / 60:.1f}"
        total, trained = (_millions(row[key]) for key in ("parameters", "trainable"))
        lines.append(f"{row['run']:<{width}}  {row['state']:<7} {row['examples'] or '?':>9} {total:>8} "
                     f"{trained:>8} {minutes:>8}  {row['after'] or '-'}")
    todo = [row for row in rows if row["state"] != "done"]
    known = [row["seconds"] for row in todo if row["seconds"] is not None]
    sources = sorted({row["source"] for row in todo if row["seconds"] is not None})
    disk = sum(row["bytes"] for row in rows) + max((row["cache_bytes"] for row in rows), default=0) * len(study.seeds)
    unmade = sum(row["examples"] is None for row in todo)  # a prepared part not made yet: sizes unknown
    unknown = [f"{unmade} runs wait for their prepared parts (sized once the sweep has made them)"] if unmade else []
    if len(todo) - len(known) - unmade:
        unknown.append(f"{len(todo) - len(known) - unmade} runs with pretrained parts not estimated (time one run "
                       "first; `vlmlab plan --preset NAME --gpu t4` for memory)")
    lines.append(f"to run: {len(todo)} runs"
                 + (f", about {sum(known) / 60 / jobs:.0f} minutes with --jobs {jobs} ({'; '.join(sources)})"
                    if known else "") + "".join(f"; {part}" for part in unknown))
    lines.append(f"disk: about {disk / 2**20:.0f} MiB (models, checkpoints with optimizer states, feature cache)")
    on_gpu = [row for row in todo if row["source"].startswith("GPU time")]
    if on_gpu:
        longest = max(sum(row["seconds"] for row in on_gpu if row["run"].endswith(f"/seed{seed}"))
                      for seed in study.seeds) / 3600
        lines.append(f"one seed's runs on one GPU: about {longest:.1f} h of training, evaluation not counted; "
                     + ("within" if longest <= COLAB_SESSION_HOURS else "more than")
                     + f" a Colab session (at most {COLAB_SESSION_HOURS} h, a free one often less). Cut off, the "
                     "same sweep command in a new session skips the finished runs and resumes a cut one from its "
                     "last checkpoint (train.save_every); on a cluster, --launcher slurm runs them side by side")
    return lines
