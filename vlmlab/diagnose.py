"""Does a VLM use its image? Measured signals, a verdict with one sentence why, the likely causes, and the same
signals as a training-time alarm.

The classic failure (a CLIP + Q-Former + GPT-2 captioner printing empty captions, its only output EOS) shows in
several signals at once; each is measured on an eval set:

- `empty_output_rate`, and `eos_first_rate`: the share of examples whose most likely first token is EOS, read
  from the first-step logits of one teacher-forced pass (so it shows even when `eval.min_new_tokens` hides it);
- `mean_output_words`, `identical_output_rate` (the share of outputs equal to the most common output given to the
  same prompt for other images) and `unchanged_with_shuffled_images` (the share of outputs that stay the same when
  each image is swapped for another image of the set);
- `score` with real, shuffled and blank (uniform grey) images, and `shuffled_image_gap` = real - shuffled: VQA
  accuracy, or CIDEr for captions when caption metrics are on;
- `reference_loss` with real, shuffled and blank images, and `reference_loss_gap` = shuffled - real: how many nats
  per answer token the image is worth to the LM, teacher-forced on the references (no generation, no Java);
- where the LM looks: `visual_attention_share`, the attention mass on the visual tokens at the first answer step
  (a prefix LM's self-attention, or an encoder-decoder's cross-attention), beside `visual_attention_uniform`, the
  share attention spread evenly would give; with cross-attention fusion, how open the gates are and how much the
  gated blocks change the hidden state (`cross_attention_relative_update`).

The verdict is `collapsed` (the model stops at once), `ignores_image` (its outputs do not follow the image) or
`uses_image`. `suspected_causes` names which of the known causes the run shows, with evidence and what to try.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from vlmlab.config import Config
from vlmlab.data.batching import ExampleDataset
from vlmlab.data.example import Example
from vlmlab.evaluate import derangement, images_by_id, predict, score, shown_image
from vlmlab.log import warn
from vlmlab.prompts import format_prompt

BLANK_ID = "blank-image"
COLLAPSE_RATE = 0.5  # empty outputs or EOS-first at least this often: collapsed
UNCHANGED_RATE = 0.9  # outputs unchanged by another image at least this often: the image is ignored
MIN_LOSS_GAP = 0.05  # nats per answer token the image must be worth to count as used
MIN_RELATIVE_GAP = 0.05  # the score must drop by at least this share of itself when images are shuffled
SHORT_PREFIX = 4  # a decoder-only LM reading at most this many visual tokens as a prefix: a short prefix
HIGH_LR = 5e-3  # full fine-tuning of the LM above this learning rate: suspect instability
MANY_EPOCHS = 20  # each training example seen this often or more: suspect too little data
CLOSED_GATE = 0.01  # cross-attention gates all within this of zero (tanh): the blocks have not opened


def blank_example(size: int = 64) -> Example:
    """A uniform grey image: what the model says when the image carries nothing."""
    return Example(Image.new("RGB", (size, size), (128, 128, 128)), None, [""], image_id=BLANK_ID)


@contextmanager
def eager_attention(model):
    """transformers returns attention weights only from its eager kernels: switch to them for a while."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _UpdateMeter:
    """Forward hooks on the gated blocks: |block(h) - h| / |h| at each example's first answer position."""

    def __init__(self, fusion):
        self.ratios: list[float] = []
        self.positions: torch.Tensor | None = None  # [B] index of the first answer step
        self.handles = [block.register_forward_hook(self._record) for block in fusion.blocks]

    def _record(self, block, args, output):
        hidden = args[0]  # [B, T, D]
        rows = torch.arange(hidden.shape[0])
        before, after = hidden[rows, self.positions], output[rows, self.positions]  # [B, D]
        self.ratios += ((after - before).norm(dim=-1) / before.norm(dim=-1).clamp(min=1e-6)).tolist()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def teacher_forced(model, dataset: ExampleDataset, examples: list[Example], cfg: Config, swap: dict | None = None,
                   attention: bool = False) -> dict:
    """One teacher-forced pass over the references: EOS-first rate, loss per answer token, and where the LM looks
    at the first answer step. `swap` replaces image ids, as in `evaluate.predict`."""
    lm = model.language
    by_id = images_by_id(dataset)
    eos_first, eos_prob, loss_sum, tokens, shares, uniform, num_visual = [], [], 0.0, 0, [], [], None
    meter = _UpdateMeter(lm.fusion) if attention and lm.fusion is not None else None
    looking = eager_attention(lm.model) if attention and lm.fusion is None else contextlib.nullcontext()
    with torch.no_grad(), looking:
        for chunk in _chunks(examples, cfg.eval.batch_size):
            usable, pixels = [], []
            for example in chunk:
                _, image_pixels = shown_image(dataset, by_id, example, swap)
                if image_pixels is not None:
                    usable.append(example)
                    pixels.append(image_pixels)
            if not usable:
                continue
            visual = model.visual_tokens(torch.stack(pixels))  # [B, M, D]
            num_visual = visual.shape[1]
            prompts = lm.encode_prompts([format_prompt(cfg.data, e.question) for e in usable])
            targets = lm.encode_answers([e.target for e in usable])
            prefix = lm.prefix_length(visual)
            if lm.is_encoder_decoder:
                first = torch.zeros(len(usable), dtype=torch.long)  # the decoder's first position
            else:  # left-padded [visual; prompt; answer]: the position before each answer predicts its first token
                length = max(prefix + len(p) + len(t) for p, t in zip(prompts, targets))
                first = torch.tensor([length - len(t) - 1 for t in targets])
            if meter is not None:
                meter.positions = first
            options = {"output_attentions": True} if attention and lm.fusion is None else {}
            output = lm(visual, prompts, targets, **options)
            batch_tokens = sum(len(t) for t in targets)
            loss_sum, tokens = loss_sum + float(output.loss) * batch_tokens, tokens + batch_tokens
            rows = torch.arange(len(usable))
            probs = output.logits[rows, first].float().softmax(-1)  # [B, V] at the first answer step
            eos_first += (probs.argmax(-1) == lm.eos_id).tolist()
            eos_prob += probs[:, lm.eos_id].tolist()
            if options:
                attended = _visual_attention(output, lm, prompts, targets, prefix, visual.shape[1], first)
                shares += attended[0]
                uniform += attended[1]
    if meter is not None:
        meter.close()
    count = len(eos_first)
    result = {
        "eos_first_rate": sum(eos_first) / count if count else None,
        "eos_first_prob": sum(eos_prob) / count if count else None,
        "reference_loss": loss_sum / tokens if tokens else None,
        "num_visual_tokens": num_visual,
    }
    if attention:
        result["visual_attention_share"] = sum(shares) / len(shares) if shares else None
        result["visual_attention_uniform"] = sum(uniform) / len(uniform) if uniform else None
        if meter is not None:
            result["cross_attention_relative_update"] = sum(meter.ratios) / len(meter.ratios) if meter.ratios else None
    return result


def _visual_attention(output, lm, prompts, targets, prefix: int, num_visual: int, first: torch.Tensor):
    """Per example: the attention mass on the visual tokens at the first answer step, averaged over layers and
    heads, and the share those tokens would get from attention spread evenly over everything readable."""
    if lm.is_encoder_decoder:  # decoder step 0 reads the right-padded encoder sequence [visual; prompt]
        layers = torch.stack([a[:, :, 0, :num_visual].sum(-1) for a in output.cross_attentions])  # [layers, B, H]
        readable = [num_visual + len(p) for p in prompts]
    else:  # left-padded; the visual prefix starts where each row's real tokens start
        length = output.attentions[0].shape[-1]
        starts = [length - prefix - len(p) - len(t) for p, t in zip(prompts, targets)]
        rows = range(len(prompts))
        layers = torch.stack([
            torch.stack([a[i, :, first[i], starts[i] : starts[i] + prefix].sum(-1) for i in rows])
            for a in output.attentions
        ])  # [layers, B, H]
        readable = [prefix + len(p) for p in prompts]
    shares = layers.float().mean(dim=(0, 2)).tolist()
    return shares, [num_visual / total for total in readable]


def _output_signals(examples: list[Example], real: list, shuffled: list) -> dict:
    pairs = [(e, r, s) for e, r, s in zip(examples, real, shuffled) if r is not None and s is not None]
    by_prompt = defaultdict(list)  # outputs given to the same prompt for different images
    for example, output, _ in pairs:
        by_prompt[example.question].append((example.image_id, output))
    same, counted = 0, 0
    for answers in by_prompt.values():
        if len({image for image, _ in answers}) > 1:
            same += Counter(output for _, output in answers).most_common(1)[0][1]
            counted += len(answers)
    outputs = [r for _, r, _ in pairs]
    return {
        "empty_output_rate": sum(not o for o in outputs) / len(outputs) if outputs else None,
        "mean_output_words": sum(len(o.split()) for o in outputs) / len(outputs) if outputs else None,
        "identical_output_rate": same / counted if counted else None,
        "unchanged_with_shuffled_images": sum(r == s for _, r, s in pairs) / len(pairs) if pairs else None,
        "example_outputs": [o for o, _ in Counter(outputs).most_common(3)],
    }


def _score(examples: list[Example], outputs: list, with_captions: bool) -> tuple[str | None, float | None]:
    """The task's score from `evaluate.score`: VQA accuracy where there are questions, else CIDEr."""
    result = score(examples, outputs, with_captions)
    if result["vqa_accuracy"] is not None:
        return "vqa_accuracy", result["vqa_accuracy"]
    if result["caption"]:
        return "CIDEr", result["caption"]["CIDEr"]
    return None, None


def measure(model, examples: list[Example], cfg: Config, full: bool = True, dataset: ExampleDataset | None = None,
            desc: str = "diagnose") -> dict:
    """The image-reliance signals of `model` on `examples`. `full`: also blank images, task scores and where the
    LM looks (the alarm leaves those out to stay cheap)."""
    if len({e.image_id for e in examples}) < 2:
        raise ValueError("diagnosing image reliance needs examples of at least two different images")
    blank = blank_example()
    if dataset is None:
        dataset = ExampleDataset([*examples, blank], cfg.data, model.vision.image_size)
    shuffle = derangement([e.image_id for e in examples], seed=cfg.train.seed)
    was_training = model.training
    model.eval()
    real = predict(model, dataset, examples, cfg, desc=f"{desc}, real images")
    shuffled = predict(model, dataset, examples, cfg, swap=shuffle, desc=f"{desc}, shuffled images")
    signals = _output_signals(examples, real, shuffled)
    forced_real = teacher_forced(model, dataset, examples, cfg, attention=full)
    forced_shuffled = teacher_forced(model, dataset, examples, cfg, swap=shuffle)
    signals["eos_first_rate"] = forced_real["eos_first_rate"]
    signals["eos_first_prob"] = forced_real["eos_first_prob"]
    signals["num_visual_tokens"] = forced_real["num_visual_tokens"]
    losses = {"real": forced_real["reference_loss"], "shuffled": forced_shuffled["reference_loss"]}
    if full:
        to_blank = {e.image_id: BLANK_ID for e in examples}
        blank_outputs = predict(model, dataset, examples, cfg, swap=to_blank, desc=f"{desc}, blank images")
        losses["blank"] = teacher_forced(model, dataset, examples, cfg, swap=to_blank)["reference_loss"]
        with_captions = cfg.eval.caption_metrics
        name, real_score = _score(examples, real, with_captions)
        scores = {"real": real_score, "shuffled": _score(examples, shuffled, with_captions)[1],
                  "blank": _score(examples, blank_outputs, with_captions)[1]}
        signals["score_name"], signals["score"] = name, scores
        signals["shuffled_image_gap"] = None if name is None else scores["real"] - scores["shuffled"]
        signals["unchanged_with_blank_images"] = _output_signals(examples, real, blank_outputs)[
            "unchanged_with_shuffled_images"]
        for key in ("visual_attention_share", "visual_attention_uniform", "cross_attention_relative_update"):
            if key in forced_real:
                signals[key] = forced_real[key]
        if model.language.fusion is not None:
            signals["cross_attention_gates"] = model.language.fusion.gates()
    signals["reference_loss"] = losses
    signals["reference_loss_gap"] = losses["shuffled"] - losses["real"]
    signals["num_examples"] = sum(o is not None for o in real)
    model.train(was_training)
    return signals


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def verdict(signals: dict) -> tuple[str, str, list[str]]:
    """(`uses_image` | `ignores_image` | `collapsed`, one sentence why, the signals that fired)."""
    empty, eos = signals["empty_output_rate"] or 0.0, signals["eos_first_rate"] or 0.0
    unchanged, loss_gap = signals["unchanged_with_shuffled_images"] or 0.0, signals["reference_loss_gap"]
    if empty >= COLLAPSE_RATE or eos >= COLLAPSE_RATE:
        fired = [f"{name}={value:.2f}" for name, value in (("empty_output_rate", empty), ("eos_first_rate", eos))
                 if value >= COLLAPSE_RATE]
        return "collapsed", (f"{_pct(empty)} of the outputs are empty and EOS is the most likely first token for "
                             f"{_pct(eos)} of the examples: the model stops before it says anything."), fired
    fired, evidence = [], []
    if unchanged >= UNCHANGED_RATE:
        fired.append(f"unchanged_with_shuffled_images={unchanged:.2f}")
        evidence.append(f"{_pct(unchanged)} of the outputs stay the same when every image is swapped for another")
    if loss_gap < MIN_LOSS_GAP:
        fired.append(f"reference_loss_gap={loss_gap:.3f}")
        evidence.append(f"the references are hardly more likely with their own image than with another one "
                        f"({loss_gap:+.3f} nats per token)")
    gap, real = signals.get("shuffled_image_gap"), (signals.get("score") or {}).get("real")
    if gap is not None and real and gap < MIN_RELATIVE_GAP * real:
        fired.append(f"shuffled_image_gap={gap:.3f}")
        evidence.append(f"{signals['score_name']} hardly drops with shuffled images "
                        f"({real:.3f} -> {signals['score']['shuffled']:.3f})")
    if fired:
        sentence = "; ".join(evidence)
        return "ignores_image", f"{sentence[0].upper()}{sentence[1:]}: the output does not follow what the image " \
                                f"shows.", fired
    score_drop = "" if gap is None else f", {signals['score_name']} {real:.3f} -> {signals['score']['shuffled']:.3f}"
    return "uses_image", (f"With every image swapped for another, {_pct(1 - unchanged)} of the outputs change and the "
                          f"references lose {loss_gap:.3f} nats per token{score_drop}: the output depends on the "
                          f"image."), fired


REMEDIES = {
    "collapsed": "language.train_padding_as_eos=false (the default), a lower train.lr, a lower EOS weight where EOS "
                 "fills the targets (language.eos_loss_weight=0.1); eval.min_new_tokens only hides the symptom",
    "ignores_image": "language.fusion=cross_attention, more visual tokens (connector.num_queries=32), "
                     "language.train=lora or frozen, a lower train.lr, more training data",
}


def _training_size(cfg: Config) -> int | None:
    """How many training examples the run had, where the config says it without loading anything."""
    data = cfg.data
    if data.train == "synthetic":
        size = data.train_images * (data.questions_per_image + int(data.captions))
        return min(size, data.train_size) if data.train_size else size
    path = Path(data.train)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open() as lines:
            return sum(1 for line in lines if line.strip())
    return None


def read_train_log(path: Path) -> list[dict]:
    """The training-loss records of a run's `train_log.jsonl` (empty when there is none)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]


def suspected_causes(model, signals: dict, cfg: Config, train_log: list[dict]) -> list[dict]:
    """Which of the known causes of an image-blind (or badly trained) captioner this run shows, from its config,
    its training log and the signals: `{cause, evidence, try}` each."""
    causes = []
    lm, language = model.language, cfg.language
    if language.train_padding_as_eos:
        causes.append({"cause": "padding trained as EOS",
                       "evidence": "language.train_padding_as_eos=true: the captions of each batch were padded "
                                   "on the left with trained EOS, so most of them began with EOS",
                       "try": "language.train_padding_as_eos=false (the default); a lower language.eos_loss_weight "
                              "or eval.min_new_tokens ends the empty outputs, not the image blindness"})
    num_visual = signals["num_visual_tokens"]
    share, uniform = signals.get("visual_attention_share"), signals.get("visual_attention_uniform")
    if not lm.is_encoder_decoder and lm.fusion is None:
        short = num_visual <= SHORT_PREFIX
        overlooked = share is not None and uniform and share < 0.5 * uniform
        if short or overlooked:
            looks = "" if share is None else (f"; they get {_pct(share)} of the attention at the first answer step "
                                              f"(spread evenly: {_pct(uniform)})")
            causes.append({"cause": "short or overlooked visual prefix",
                           "evidence": f"the decoder-only LM reads the image as a prefix of "
                                       f"{num_visual} token(s){looks}",
                           "try": "language.fusion=cross_attention, or more visual tokens (connector.num_queries=32)"})
    gates = signals.get("cross_attention_gates")
    if gates and max(abs(value) for pair in gates for value in pair) < CLOSED_GATE:
        causes.append({"cause": "closed cross-attention gates",
                       "evidence": f"every gate is still within {CLOSED_GATE} of zero (tanh): the LM has not started "
                                   f"reading the image",
                       "try": "language.train=frozen or lora (then the gates are the LM's way to lower the loss), "
                              "or train longer"})
    losses = [r["loss"] for r in train_log]
    rose = len(losses) > 1 and losses[-1] > 1.5 * min(losses)
    if cfg.train.lr > HIGH_LR or (language.train == "full" and rose):
        full = language.train == "full"
        curve = (f"; training loss {losses[0]:.2f} first, {min(losses):.2f} at best, {losses[-1]:.2f} last"
                 if losses else "")
        trained = "the whole LM and the connector were" if full else "the connector was"
        causes.append({"cause": "unstable full fine-tuning" if full else "high learning rate",
                       "evidence": f"{trained} trained at train.lr={cfg.train.lr:g}{curve}",
                       "try": f"a lower train.lr (e.g. {cfg.train.lr / 10:g})"
                              + (", language.train=lora, or language.train=frozen with language.fusion=cross_attention"
                                 if full else "")})
    size = _training_size(cfg)
    epochs = cfg.train.max_steps * cfg.train.batch_size / size if size else None
    held_out = (signals.get("reference_loss") or {}).get("real")
    memorised = bool(losses) and held_out is not None and not language.train_padding_as_eos \
        and held_out > 2 * losses[-1] + 0.1
    if (epochs is not None and epochs >= MANY_EPOCHS) or memorised:
        seen = f"{size} training examples, each seen about {epochs:.0f} times" if epochs else "the training set"
        fit = f"; loss {losses[-1]:.2f} on training batches against {held_out:.2f} held out" if memorised else ""
        causes.append({"cause": "too little data",
                       "evidence": f"{seen}{fit}",
                       "try": "more training data (a larger data.train_images, or a mixture in data.train)"})
    return causes


def diagnose(model, examples: list[Example], cfg: Config, train_log: list[dict] | None = None) -> dict:
    """The full report: signals, `verdict`, `reason`, `signals_fired`, the `suspected_causes` the run shows
    (listed whatever the verdict: a model can read its image and still have memorised too little data) and,
    unless the image is used, what to `try`."""
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    report = measure(model, examples, cfg)
    report["verdict"], report["reason"], report["signals_fired"] = verdict(report)
    report["suspected_causes"] = suspected_causes(model, report, cfg, train_log or [])
    if report["verdict"] != "uses_image":
        report["try"] = REMEDIES[report["verdict"]]
    return report


def report_lines(report: dict) -> list[str]:
    """The report as a person reads it."""

    def num(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"verdict             {report['verdict']}",
        f"  why               {report['reason']}",
        f"empty outputs       {num(report['empty_output_rate'], 2)}    EOS first: {num(report['eos_first_rate'], 2)} "
        f"(mean p(EOS) {num(report['eos_first_prob'], 2)})",
        f"mean output words   {num(report['mean_output_words'], 1)}    identical across images: "
        f"{num(report['identical_output_rate'], 2)}",
        f"unchanged outputs   shuffled images {num(report['unchanged_with_shuffled_images'], 2)}, blank images "
        f"{num(report.get('unchanged_with_blank_images'), 2)}",
        "reference loss      " + "  ".join(f"{k} {num(v)}" for k, v in report["reference_loss"].items())
        + f"   gap {num(report['reference_loss_gap'])} nats/token",
    ]
    if report.get("score_name"):
        lines.append(f"{report['score_name']:<19} " + "  ".join(f"{k} {num(v)}" for k, v in report["score"].items())
                     + f"   shuffled_image_gap {num(report['shuffled_image_gap'])}")
    if report.get("visual_attention_share") is not None:
        lines.append(f"attention on image  {num(report['visual_attention_share'], 2)} "
                     f"(spread evenly: {num(report['visual_attention_uniform'], 2)})")
    if report.get("cross_attention_gates") is not None:
        gates = ", ".join(f"{a:+.2f}/{f:+.2f}" for a, f in report["cross_attention_gates"])
        lines.append(f"cross-attn gates    {gates} (attention/feed-forward, tanh); relative update "
                     f"{num(report.get('cross_attention_relative_update'))}")
    for cause in report.get("suspected_causes", []):
        lines.append(f"suspected cause     {cause['cause']}: {cause['evidence']}; try {cause['try']}")
    if "try" in report:
        lines.append(f"things to try       {report['try']}")
    return lines


class ConditioningAlarm:
    """During training: every `train.alarm_every` steps from `train.alarm_warmup` on, measures on a few held-out
    examples whether the outputs depend on the image, and warns with the signal that fired and what to try."""

    def __init__(self, cfg: Config, examples: list[Example], image_size: int):
        tc = cfg.train
        self.every, self.warmup = tc.alarm_every, tc.alarm_warmup
        self.examples = examples[: tc.alarm_examples]
        if len({e.image_id for e in self.examples}) < 2:
            self.every = 0  # nothing to compare: no alarm
        self.cfg = copy.deepcopy(cfg)
        self.cfg.eval.caption_max_new_tokens = min(cfg.eval.caption_max_new_tokens, 16)  # enough to tell apart
        self.dataset = ExampleDataset([*self.examples, blank_example()], cfg.data, image_size)

    def due(self, step: int) -> bool:
        return bool(self.every) and step >= self.warmup and step % self.every == 0

    def check(self, model, step: int) -> dict:
        signals = measure(model, self.examples, self.cfg, full=False, dataset=self.dataset, desc="alarm")
        name, reason, fired = verdict(signals)
        if name != "uses_image":
            warn(f"step {step}: the model {name.replace('_', ' ')} ({', '.join(fired)}). {reason} "
                 f"Try: {REMEDIES[name]}.")
        signals.pop("example_outputs")
        return {"verdict": name, "signals_fired": fired, **signals}
