"""`vlmlab bench`: vlmlab against transformers' BLIP-2 built with the same architecture, measured side by side.

The peer is `Blip2ForConditionalGeneration` configured as the preset's model: a vision tower of the same width,
heads, MLP size, patch and resolution, as deep as our features need (BLIP-2 reads its ViT's last layer; with
`vision.feature_layer=-2` both run the first L - 1 of L layers, as BLIP-2's own recipe does); a Q-Former of the
same width, depth (cross-attention in every layer, as ours), heads, feed-forward size and number of queries; the
same LM config and tokenizer. Both sides get random weights and the preset's tuning (the tower frozen, the recipe
measured; the LM full, frozen or LoRA with the same peft config), the same images, prompts, answers and batches,
the same precision (autocast), optimizer (AdamW) and gradient clipping.

Each side runs in a fresh process, so that its peak memory is its own: `torch.cuda.max_memory_allocated` on a
GPU, the process's peak resident set (ru_maxrss: weights, activations, data, the libraries) on a CPU. Times are
wall-clock (after `torch.cuda.synchronize` on a GPU); with `--cpu-time`, on a CPU shared with other work, they are
each process's CPU time with torch on one thread, which other processes cannot stretch. Measured:
- training samples/s in the first epoch: vlmlab computes the tower's features of the epoch's images into a fresh
  feature cache (feature_cache.py) and trains from them; BLIP-2 runs its tower on every example;
- training samples/s in the later epochs: vlmlab reads its cache, its tower parked (parking.py) as in
  `vlmlab train`; BLIP-2 runs its tower again;
- generation tokens/s: greedy and batched with the KV cache, the tower included, exactly `eval.max_new_tokens`
  new tokens per example on both sides (min_new_tokens = max_new_tokens); vlmlab's tower is brought back from
  parking before, timed apart (`ready_to_generate_seconds`: a cost paid once per evaluation during training);
- peak memory over the whole run of the side.
The data is the synthetic world drawn at the tower's resolution, each batch over round(batch / Q) images of which
some carry a second question, Q = `questions_per_image`. vlmlab runs its tower and connector once per image, as
it does in training and evaluation; BLIP-2's interface takes an image per question. Q = 1 is the strictest case;
a uniform draw of 40k of VQAv2's 443,757 training questions over its 82,783 images, the recommended recipe's
data, gives about 1.22.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from transformers import (AutoModel, AutoModelForSeq2SeqLM, Blip2Config, Blip2ForConditionalGeneration,
                          Blip2QFormerConfig, Blip2VisionConfig)

from vlmlab.config import Config, ConfigError, validate
from vlmlab.costs import peak_memory_bytes, peak_memory_source
from vlmlab.data.batching import ExampleDataset, collate
from vlmlab.data.synthetic import make_split
from vlmlab.distributed import Processes
from vlmlab.feature_cache import training_data
from vlmlab.language import IGNORE_INDEX, TINY_FAMILIES as TINY_LMS, LanguageModel, build_language
from vlmlab.model import assemble_vlm, resolve_device
from vlmlab.parking import park_if_cached
from vlmlab.plan import architecture
from vlmlab.prompts import training_texts
from vlmlab.registry import lookup
from vlmlab.tokenizer import train_tokenizer
from vlmlab.train import make_optimizer, resolve_precision
from vlmlab.tuning import ADAPTED, lora_config
from vlmlab.vision import TINY_FAMILIES as TINY_TOWERS, VisionTower, layers_computed

SIDES = ("vlmlab", "transformers_blip2")


class BenchError(ValueError):
    """A side of the bench failed; the message names the side and the error."""

NORMALISATION = [0.5, 0.5, 0.5]  # mean and std of both sides' pixels (random weights: any values do)
@dataclasses.dataclass
class Parts:
    """What both sides build from: the preset, the two transformers configs, the data and its batches."""

    config: Config
    vision: object  # a ViT's transformers config
    language: object  # an encoder-decoder LM's transformers config
    tokenizer: object  # trained on the bench's texts; the LM keeps its own vocabulary size
    image_size: int
    examples: list
    batches: list[list[int]]  # the example indices of each step of an epoch (every epoch the same)
    epochs: int
    cpu_time: bool  # time by the process's CPU time, torch on one thread, instead of the wall clock

    @property
    def samples(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def questions_per_image(self) -> float:
        return self.samples / sum(len({self.examples[i].image_id for i in batch}) for batch in self.batches)


def _layout(steps: int, batch_size: int, per_image: float, seed: int, image_size: int) -> tuple[list, list]:
    """(examples, batches): `steps` batches of `batch_size` questions, each over round(batch_size / per_image)
    images, of which the first ones carry a second question (as many as fill the batch)."""
    if not 1.0 <= per_image <= 2.0:
        raise ConfigError(f"--questions-per-image must be between 1 and 2, got {per_image}")
    images = max(1, round(batch_size / per_image))  # per batch
    doubled = min(batch_size - images, images)  # images of a batch that carry two questions
    pairs = make_split("train", steps * images, seed=seed, image_size=image_size, questions_per_image=2,
                       captions=False)  # two questions per image, in image order
    examples, batches = [], []
    for step in range(steps):
        batch = []
        for image in range(step * images, (step + 1) * images):
            for question in pairs[2 * image : 2 * image + 1 + (image % images < doubled)]:
                batch.append(len(examples))
                examples.append(question)
        batches.append(batch)
    return examples, batches


def plan(cfg: Config, steps: int, epochs: int, cpu_time: bool = False, questions_per_image: float = 1.0) -> Parts:
    """Checks that BLIP-2 can mirror the preset, and lays out the data: `steps` batches per epoch."""
    cfg = validate(copy.deepcopy(cfg))
    cfg.vision.train = "frozen"  # the recipe measured: a frozen tower, whose features vlmlab caches ...
    cfg.train.feature_cache, cfg.train.feature_cache_dir = "on", ""  # ... in a fresh cache, filled in epoch one
    if steps < 1 or epochs < 2:
        raise ConfigError(f"bench needs at least 1 step and 2 epochs (the later ones are measured), got {steps}, "
                          f"{epochs}")
    if cpu_time and resolve_device(cfg.train.device).type != "cpu":
        raise ConfigError("--cpu-time measures CPU runs; on a GPU the bench times by the wall clock")
    if cfg.connector.kind != "qformer":
        raise ConfigError(f"BLIP-2's connector is a Q-Former: bench needs connector.kind=qformer, got "
                          f"{cfg.connector.kind!r}")
    vision = (architecture(cfg.vision, "vision.model") if cfg.vision.model
              else lookup(TINY_TOWERS, cfg.vision.family, "tiny vision family")(cfg.vision).config)
    if not hasattr(vision, "patch_size"):
        raise ConfigError(f"BLIP-2's tower is a ViT: bench cannot mirror a {vision.model_type} tower")
    examples, batches = _layout(steps, cfg.train.batch_size, questions_per_image, cfg.data.seed, vision.image_size)
    tokenizer = train_tokenizer(training_texts(examples, cfg.data), cfg.language.vocab_size)
    language = (architecture(cfg.language, "language.model") if cfg.language.model
                else lookup(TINY_LMS, cfg.language.family, "tiny language family")(cfg.language, tokenizer).config)
    if not language.is_encoder_decoder:
        raise ConfigError(f"bench measures the encoder-decoder recipe (T5, Flan-T5); this preset's LM is "
                          f"{language.model_type}")
    return Parts(cfg, vision, language, tokenizer, vision.image_size, examples, batches, epochs, cpu_time)


# -- the two sides: each returns (model, the batches of an epoch, the loss of a batch, what readies it for
# generation once training is done, generation for a batch) --
def _vlmlab(parts: Parts, device, precision, workdir):
    cfg = parts.config
    vision = VisionTower(AutoModel.from_config(parts.vision), cfg.vision.feature_layer, parts.image_size,
                         NORMALISATION, NORMALISATION)
    language = LanguageModel(AutoModelForSeq2SeqLM.from_config(parts.language), parts.tokenizer, cfg.language)
    model = assemble_vlm(vision, language, cfg).to(device)
    if cfg.train.compile:  # as train.py does
        for part in (model.vision.model, model.connector, model.language.model):
            part.compile()
    loader, parking = [], []

    def data():
        if not loader:  # the first epoch computes the features of its images into the cache, once
            dataset, collate_fn = training_data(model, parts.examples, cfg, workdir, parts.batches, precision,
                                                Processes(device=device))
            loader.append(DataLoader(dataset, batch_sampler=parts.batches, collate_fn=collate_fn,
                                     pin_memory=device.type == "cuda"))
            # as train.py does: the tower waits off the device while steps read the cache
            parking.extend(filter(None, [park_if_cached(model, dataset, cfg.train.park_tower)]))
        return loader[0]

    def loss(batch: dict) -> torch.Tensor:
        return model(batch.get("pixels"), batch["prompts"], batch["targets"], batch["image_index"],
                     features=batch.get("features"))

    def ready() -> None:  # the parked tower back, as after `vlmlab train`'s last step
        for tower in parking:
            tower.unpark()

    def generate(batch: dict, new_tokens: int) -> None:
        model.generate(batch["pixels"], batch["prompts"], new_tokens, batch["image_index"], min_new_tokens=new_tokens)

    return model, data, loss, ready, generate


def _blip2_config(parts: Parts, image_token: int) -> Blip2Config:
    vision, connector = parts.vision, parts.config.connector
    return Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            # BLIP-2 takes its ViT's last layer: the layers up to our feature layer (BLIP-2's own recipe drops
            # the last one for the second-last's features, as `vision.feature_layer=-2` does)
            num_hidden_layers=layers_computed(vision.num_hidden_layers, parts.config.vision.feature_layer),
            num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps),
        qformer_config=Blip2QFormerConfig(
            hidden_size=connector.hidden_size, num_hidden_layers=connector.num_layers,
            num_attention_heads=connector.num_heads, intermediate_size=4 * connector.hidden_size,
            cross_attention_frequency=1, encoder_hidden_size=vision.hidden_size,
            hidden_dropout_prob=connector.dropout, attention_probs_dropout_prob=connector.dropout),
        text_config=parts.language.to_dict(),
        num_query_tokens=connector.num_queries,
        image_token_index=image_token,
    )


def _blip2(parts: Parts, device, precision, workdir):
    cfg, tokenizer = parts.config, parts.tokenizer
    image_token = tokenizer.unk_token_id  # a byte-level BPE never emits UNK: free to mark the query positions
    peer = Blip2ForConditionalGeneration(_blip2_config(parts, image_token))
    peer.vision_model.requires_grad_(False)
    if cfg.language.train in ADAPTED:
        peer.language_model = get_peft_model(peer.language_model, lora_config(peer.language_model, cfg.language,
                                                                               "language"))
    else:
        peer.language_model.requires_grad_(cfg.language.train == "full")
    peer.to(device)
    if cfg.train.compile:
        for part in (peer.vision_model, peer.qformer, peer.language_model):
            part.compile()
    # vlmlab's own tokenisation of prompts and answers, so that both sides read the very same token ids
    ids = build_language(dataclasses.replace(cfg.language, model="", family="t5"), tokenizer)
    loader = DataLoader(ExampleDataset(parts.examples, cfg.data, parts.image_size), batch_sampler=parts.batches,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    queries = [image_token] * cfg.connector.num_queries

    def inputs(batch: dict) -> dict:
        rows = [torch.tensor(queries + prompt) for prompt in ids.encode_prompts(batch["prompts"])]
        pixels = batch["pixels"][batch["image_index"]].to(device).float() / 255.0
        return {
            "pixel_values": (pixels - NORMALISATION[0]) / NORMALISATION[0],
            "input_ids": pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id).to(device),
            "attention_mask": pad_sequence([torch.ones_like(row) for row in rows], batch_first=True).to(device),
        }

    def loss(batch: dict) -> torch.Tensor:
        labels = [torch.tensor(row) for row in ids.encode_targets(batch["targets"])]
        return peer(**inputs(batch), labels=pad_sequence(labels, True, IGNORE_INDEX).to(device)).loss

    def generate(batch: dict, new_tokens: int) -> None:
        peer.generate(**inputs(batch), max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
                      do_sample=False)

    return peer, lambda: loader, loss, lambda: None, generate


BUILDERS = {"vlmlab": _vlmlab, "transformers_blip2": _blip2}


# -- measuring one side, in a process of its own ---------------------------------------------------------------
def _clock(device: torch.device, cpu_time: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.process_time() if cpu_time else time.perf_counter()


def measure(side: str, parts: Parts) -> dict:
    """Builds one side and times its training epochs and generation; returns its figures."""
    cfg = parts.config
    torch.manual_seed(cfg.train.seed)
    if parts.cpu_time:  # one thread: no time spent spinning while other processes hold the cores
        torch.set_num_threads(1)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as workdir:
        model, data, loss_of, ready, generate = BUILDERS[side](parts, device, precision, Path(workdir))
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        trained = [p for p in model.parameters() if p.requires_grad]
        model.train()
        seconds = []
        for _ in range(parts.epochs):
            started = _clock(device, parts.cpu_time)
            for batch in data():  # timed too: vlmlab's first epoch fills its feature cache here
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = loss_of(batch)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained, cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            seconds.append(_clock(device, parts.cpu_time) - started)
        model.eval()
        started = _clock(device, parts.cpu_time)
        ready()
        ready_seconds = _clock(device, parts.cpu_time) - started
        pixels = DataLoader(ExampleDataset(parts.examples, cfg.data, parts.image_size), batch_sampler=parts.batches,
                            collate_fn=collate)
        generated, started = 0, _clock(device, parts.cpu_time)
        with torch.no_grad(), autocast:
            for batch in pixels:
                generate(batch, cfg.eval.max_new_tokens)
                generated += len(batch["prompts"]) * cfg.eval.max_new_tokens
        generate_seconds = _clock(device, parts.cpu_time) - started
    return {
        "train_samples_per_second_first_epoch": parts.samples / seconds[0],
        "train_samples_per_second_later_epochs": parts.samples * (parts.epochs - 1) / sum(seconds[1:]),
        "generate_tokens_per_second": generated / generate_seconds,
        "ready_to_generate_seconds": ready_seconds,
        "peak_memory_bytes": peak_memory_bytes(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in trained),
        "last_loss": loss.item(),
    }


def _side_process(side: str, parts: Parts, results) -> None:
    try:
        results.put((side, measure(side, parts)))
    except Exception as err:  # noqa: BLE001 - reported by the parent as one line
        results.put((side, f"{type(err).__name__}: {err}"))


def run_bench(cfg: Config, steps: int = 4, epochs: int = 3, cpu_time: bool = False,
              questions_per_image: float = 1.0) -> dict:
    """Both sides, one after the other, each in a fresh process; the figures and their ratios (vlmlab / peer)."""
    parts = plan(cfg, steps, epochs, cpu_time, questions_per_image)
    context = multiprocessing.get_context("spawn")
    sides = {}
    for side in SIDES:
        results = context.Queue()
        process = context.Process(target=_side_process, args=(side, parts, results))
        process.start()
        name, figures = results.get()
        process.join()
        if isinstance(figures, str):
            raise BenchError(f"bench, {name} side: {figures}")
        sides[name] = figures
    ours, peer = sides["vlmlab"], sides["transformers_blip2"]
    device = resolve_device(cfg.train.device)
    return {
        "train_speedup_vs_hf": ours["train_samples_per_second_later_epochs"]
        / peer["train_samples_per_second_later_epochs"],
        "train_speedup_vs_hf_first_epoch": ours["train_samples_per_second_first_epoch"]
        / peer["train_samples_per_second_first_epoch"],
        "generate_speedup_vs_hf": ours["generate_tokens_per_second"] / peer["generate_tokens_per_second"],
        "peak_memory_ratio_vs_hf": ours["peak_memory_bytes"] / peer["peak_memory_bytes"],
        "peak_memory": peak_memory_source(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(resolve_precision(cfg.train.precision, device) or "fp32").replace("torch.", ""),
        "batch_size": cfg.train.batch_size,
        "questions_per_image": parts.questions_per_image,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "new_tokens": cfg.eval.max_new_tokens,
        "timer": "process CPU time, 1 thread" if cpu_time else "wall clock",
        "torch_threads": 1 if cpu_time else torch.get_num_threads(),
        **sides,
    }


def report_lines(result: dict, preset: str) -> list[str]:
    ours, peer = result["vlmlab"], result["transformers_blip2"]
    rows = [
        ("train samples/s, first epoch", "train_samples_per_second_first_epoch",
         "train_speedup_vs_hf_first_epoch", ""),
        ("train samples/s, later epochs", "train_samples_per_second_later_epochs", "train_speedup_vs_hf", ">= 3"),
        ("generation tokens/s", "generate_tokens_per_second", "generate_speedup_vs_hf", ">= 1"),
    ]
    lines = [f"vlmlab bench --preset {preset}: {result['device']}, {result['precision']}, batch "
             f"{result['batch_size']} ({result['questions_per_image']:.2f} questions per image), "
             f"{result['steps_per_epoch']} steps x {result['epochs']} epochs, "
             f"{result['new_tokens']} new tokens, timed by {result['timer']}",
             f"{'':32}{'vlmlab':>10}{'BLIP-2 (HF)':>14}{'ratio':>8}  target"]
    for label, key, ratio, target in rows:
        lines.append(f"{label:<32}{ours[key]:>10.2f}{peer[key]:>14.2f}{result[ratio]:>8.2f}  {target}")
    gib = 2**30
    lines.append(f"{'peak memory, GiB':<32}{ours['peak_memory_bytes'] / gib:>10.2f}"
                 f"{peer['peak_memory_bytes'] / gib:>14.2f}{result['peak_memory_ratio_vs_hf']:>8.2f}  <= 1   "
                 f"({result['peak_memory']})")
    lines.append(f"{'parameters (trained), M':<32}{ours['parameters'] / 1e6:>10.1f}{peer['parameters'] / 1e6:>14.1f}"
                 f"   ({ours['trained_parameters'] / 1e6:.1f} / {peer['trained_parameters'] / 1e6:.1f} trained)")
    return lines
