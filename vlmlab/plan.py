"""`vlmlab plan`: will a config train on a given GPU, and with which micro-batch, accumulation and checkpointing?

The estimate is a simulation, not a formula. The model is built with its real shapes on PyTorch's `meta` device
(nothing is allocated or downloaded: the presets' hub checkpoints have their architectures written out below,
anything else is read from its config.json), its weights become fake tensors (`FakeTensorMode`: shapes and
dtypes, no data), and one training step runs on them exactly as `vlmlab train` runs it: the same parts and
adapters, autocast to the GPU's half precision, the loss on the answer tokens, backward, an AdamW step. A
dispatch mode counts the bytes of every tensor storage as it is created and as it is freed; its maximum is the
step's peak memory, what `torch.cuda.max_memory_allocated` would report (weights, gradients, optimizer states,
activations kept for backward, temporaries, the logits). Where the run trains from the feature cache (a frozen
tower without augmentation: `train.feature_cache=auto`), the step reads fp16 features instead of running the
tower, without the tower's weights when they are parked (`train.park_tower`), and the cache's fill before training
(every weight resident, the tower run without gradients) is simulated too: the larger of the two peaks counts.

The step runs on the CPU's autocast, so the few ops whose precision differs between CPU and CUDA autocast and
the attention kernels' workspaces make it approximate; the CUDA context (~0.5 GiB) and the caching allocator's
slack (~10%) are added on top before comparing with the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2Config,
    CLIPVisionConfig,
    GPT2Config,
    InstructBlipConfig,
    LlamaConfig,
    SiglipVisionConfig,
    T5Config,
)

from vlmlab.blip2 import BY_CONNECTOR, family_of, qformer_connector
from vlmlab.config import Config, ConfigError, LanguageConfig, VisionConfig
from vlmlab.feature_cache import cache_wanted
from vlmlab.language import LanguageModel
from vlmlab.loading import WEIGHT_DTYPES, pretrained_config
from vlmlab.model import VLM, assemble_vlm
from vlmlab.presets import EVAL_ONLY
from vlmlab.registry import lookup
from vlmlab.tokenizer import train_tokenizer
from vlmlab.tuning import check_modes, enable_gradient_checkpointing
from vlmlab.vision import VISION_HALF_OF, VisionTower

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # CUDA's own context and kernels: on the GPU, outside what PyTorch allocates
ALLOCATOR_SLACK = 0.10  # the caching allocator's rounding and fragmentation, as a share of the peak


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # total memory as `torch.cuda.get_device_properties(0).total_memory` reports it (approx.)
    bf16: bool  # bf16 tensor cores (Ampere and later); without them fp16 with a loss scaler
    half_tflops: float  # the vendor's dense fp16/bf16 tensor-core peak (without sparsity)


GPUS = {
    "t4": Gpu("NVIDIA T4 16 GB", 14.7, bf16=False, half_tflops=65.0),
    "l4": Gpu("NVIDIA L4 24 GB", 22.0, bf16=True, half_tflops=121.0),
    "a100-40g": Gpu("NVIDIA A100 40 GB", 39.4, bf16=True, half_tflops=312.0),
    "a100-80g": Gpu("NVIDIA A100 80 GB", 79.1, bf16=True, half_tflops=312.0),
}
# The share of that peak a training step of these models sustains, assumed (not measured here): small matmuls,
# fp32 layers and the optimizer keep it well below 1. The time it gives is a planning figure, good to about 2x.
ASSUMED_UTILISATION = 0.25


def _t5(d_model: int, d_ff: int, layers: int, heads: int) -> T5Config:
    # Flan-T5 is T5 v1.1: gated-GELU feed-forward, 64-wide heads, untied input and output embeddings.
    return T5Config(vocab_size=32128, d_model=d_model, d_ff=d_ff, d_kv=64, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _vit(config_class, width: int, layers: int, heads: int, image: int, patch: int):
    return config_class(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=heads, image_size=image, patch_size=patch)


def _blip2(config_class, text: T5Config, **qformer):
    # Salesforce's BLIP-2 / InstructBLIP: EVA ViT-g/14 at 224 px, its last of 40 blocks dropped (1408 wide,
    # 39 blocks: transformers' vision defaults), a BERT-base Q-Former (cross-attention every 2nd layer) with 32
    # queries, an LM; InstructBLIP's Q-Former also embeds text: BERT's vocabulary and a [DEC] token.
    return config_class(text_config=text.to_dict(), qformer_config=qformer, num_query_tokens=32)


# The architectures of the presets' hub checkpoints, so that planning and the bench need no download.
KNOWN_ARCHITECTURES = {
    "openai/clip-vit-large-patch14": lambda: _vit(CLIPVisionConfig, 1024, 24, 16, 224, 14),
    "openai/clip-vit-base-patch32": lambda: _vit(CLIPVisionConfig, 768, 12, 12, 224, 32),
    "google/siglip-base-patch16-224": lambda: _vit(SiglipVisionConfig, 768, 12, 12, 224, 16),
    "google/flan-t5-small": lambda: _t5(512, 1024, 8, 6),
    "google/flan-t5-base": lambda: _t5(768, 2048, 12, 12),
    "google/flan-t5-large": lambda: _t5(1024, 2816, 24, 16),
    "Salesforce/blip2-flan-t5-xl": lambda: _blip2(Blip2Config, _t5(2048, 5120, 24, 32)),
    "Salesforce/instructblip-flan-t5-xl": lambda: _blip2(InstructBlipConfig, _t5(2048, 5120, 24, 32),
                                                         vocab_size=30523),
    "gpt2": lambda: GPT2Config(),
    "HuggingFaceTB/SmolLM2-135M-Instruct": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


OWN_OUTPUT_LAYER = {"google/flan-t5-small", "google/flan-t5-base", "google/flan-t5-large",
                    "Salesforce/blip2-flan-t5-xl", "Salesforce/instructblip-flan-t5-xl"}


def architecture(section: VisionConfig | LanguageConfig, key: str):
    """The transformers config of the checkpoint a `vision` / `language` section names (`key`: its
    `section.model`, for errors): written out above for the presets' names, else read (path or hub)."""
    if section.model in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[section.model]()
    return pretrained_config(key, section.model, section.trust_remote_code, section.revision,
                             getattr(section, "gguf_file", ""))


def _vision_from_architecture(cfg) -> VisionTower:
    config = architecture(cfg, "vision.model")
    config = getattr(config, "vision_config", config)  # a dual encoder (CLIP, SigLIP) or BLIP-2: its vision half
    model_class = VISION_HALF_OF.get(config.model_type)
    model = (model_class(config) if model_class else AutoModel.from_config(config)).to(WEIGHT_DTYPES[cfg.dtype])
    image_size = getattr(config, "image_size", None) or cfg.image_size
    return VisionTower(model, cfg.feature_layer, image_size, [0.5] * 3, [0.5] * 3)  # statistics: no memory role


def _language_from_architecture(cfg) -> LanguageModel:
    config = architecture(cfg, "language.model")
    if family_of(config) is not None:  # a whole BLIP-2 / InstructBLIP checkpoint: its LM
        config = config.text_config
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    # The step below feeds token ids, never text: the tokenizer is asked only for an EOS id, so a local one will do.
    tokenizer = train_tokenizer(["Question: Answer:"], 300)
    model = model_class.from_config(config)
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output.weight is embedding.weight and _has_own_output_layer(cfg.model):
        # transformers 5 builds T5 from a bare config with its output layer tied to the input embedding, and
        # unties it only when the checkpoint's weights hold one of their own, as Flan-T5's do.
        output.weight = nn.Parameter(torch.empty_like(embedding.weight))
    _to_dtype(model, WEIGHT_DTYPES[cfg.dtype])
    return LanguageModel(model, tokenizer, cfg)


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """`model` in `dtype` as from_pretrained(dtype=) loads it: in fp16 its `_keep_in_fp32_modules` stay fp32."""
    model.to(dtype)
    if dtype == torch.float16:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        for path, module in model.named_modules():
            if path.rpartition(".")[2] in keep:
                module.float()


def _connector_from_architecture(cfg: Config, vision: VisionTower, language: LanguageModel) -> nn.Module | None:
    """A transformers Q-Former of the config's shape, `connector.init` left unread (assemble_vlm builds the rest)."""
    family = BY_CONNECTOR.get(cfg.connector.kind)
    if family is None:
        return None
    tokenizer = train_tokenizer(["Question: Answer:"], 300) if family.reads_prompt else None  # as for the LM
    _, vision_dim, _ = vision.feature_layout()
    return qformer_connector(dataclasses.replace(cfg.connector, init=""), vision_dim, language.hidden_size, tokenizer)


def _has_own_output_layer(name: str) -> bool:
    """Whether checkpoint `name` stores an output layer apart from its input embedding (Flan-T5; not GPT-2)."""
    if name in KNOWN_ARCHITECTURES:
        return name in OWN_OUTPUT_LAYER
    for path in Path(name).glob("*.safetensors"):  # a local checkpoint: its tensor names, no weights read
        with safe_open(path, "pt") as weights:
            if any(key.endswith("lm_head.weight") for key in weights.keys()):
                return True
    return False


def build_from_architecture(cfg: Config, device: str = "meta") -> VLM:
    """The VLM of `cfg` at its real size with random weights (on `meta`: none at all), nothing downloaded;
    adapters and frozen parts as in training."""
    check_modes(cfg)
    for part in ("vision", "language"):
        if not getattr(cfg, part).model:
            raise ConfigError(f"plan needs a pretrained {part} part ({part}.model=); the tiny from-scratch parts "
                              f"are meant for a CPU")
    with torch.device(device):
        vision, language = _vision_from_architecture(cfg.vision), _language_from_architecture(cfg.language)
        return assemble_vlm(vision, language, cfg, _connector_from_architecture(cfg, vision, language))


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of live tensor storages: each is added when an op first returns it and subtracted when
    it is freed (a weak reference's callback); `peak` is the most ever live at once."""

    def __init__(self, tensors):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for tensor in tensors:
            self._track(tensor)

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        nbytes = storage.nbytes()
        self.live[storage] = weakref.ref(storage, lambda _, n=nbytes: self._freed(n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def to_fake(model: nn.Module) -> None:
    """Moves meta weights to fake CPU tensors (call inside a FakeTensorMode), keeping tied weights tied (T5 and
    GPT-2 share their embedding with the output layer; `to_empty` alone would give each module its own copy)."""
    places = {}  # id(parameter) -> every (module, name) that holds it
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    model.to_empty(device="cpu")
    for (owner, owner_name), *others in places.values():
        for module, name in others:
            setattr(module, name, getattr(owner, owner_name))


def _resident(model: VLM, optimizer: torch.optim.Optimizer, parked: bool) -> list[torch.Tensor]:
    """Tensors alive before a step: weights and buffers (the tower's not, when `parked`), gradients
    (accumulating), optimizer states."""
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    tower = {id(t) for t in (*model.vision.parameters(), *model.vision.buffers())} if parked else set()
    weights = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in tower]
    return [*weights, *grads, *states]


def step_inputs(model: VLM, cfg: Config, micro_batch: int, cached: bool = False) -> tuple:
    """A micro-batch at the longest prompts and targets `cfg` allows: (pixels, features, prompt ids, target ids);
    `cached`: the tower's features as the feature cache gives them (fp16 `[B, N, Dv]`), and no pixels."""
    size = model.vision.image_size
    pixels, features = torch.zeros(micro_batch, 3, size, size, dtype=torch.uint8, device=model.device), None
    if cached:
        num_features, width, _ = model.vision.feature_layout()
        pixels, features = None, torch.zeros(micro_batch, num_features, width, dtype=torch.float16,
                                             device=model.device)
    # Token ids (any id below the vocabulary size) at the longest lengths allowed, one prompt a token short:
    # real batches are padded, and transformers then builds its attention masks (it skips them for none).
    longest = cfg.language.max_prompt_tokens
    prompts = [[5] * (longest - (i == micro_batch - 1 and micro_batch > 1)) for i in range(micro_batch)]
    targets = [[6] * cfg.language.max_target_tokens] * micro_batch
    return pixels, features, prompts, targets


def train_step(model: VLM, optimizer: torch.optim.Optimizer, inputs: tuple, amp_dtype: torch.dtype | None) -> None:
    """Forward, backward and update, as `vlmlab train` runs them (the loss on the answer tokens only)."""
    pixels, features, prompts, targets = inputs
    with torch.autocast(model.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = model.language.loss(model.visual_tokens(pixels, features), prompts, targets)
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_peak(model: VLM, optimizer: torch.optim.Optimizer, cfg: Config, micro_batch: int, accumulating: bool,
              amp_dtype: torch.dtype | None, cached: bool = False, parked: bool = False) -> int:
    """Peak bytes of one training micro-step of `micro_batch` examples.

    `accumulating`: gradients of an earlier micro-batch are already there (grad_accum > 1). The optimizer must
    hold its states already (`warm_optimizer`), as it does in every step after the first. `cached`: the step
    reads the tower's features from the feature cache; `parked`: the tower's weights are off the GPU meanwhile.
    """
    inputs = step_inputs(model, cfg, micro_batch, cached)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param) if accumulating else None
    tracker = PeakMemory(_resident(model, optimizer, parked))
    with tracker:
        train_step(model, optimizer, inputs, amp_dtype)
    return tracker.peak


def fill_peak(model: VLM, optimizer: torch.optim.Optimizer, cfg: Config, micro_batch: int,
              amp_dtype: torch.dtype | None) -> int:
    """Peak bytes of the feature cache's fill before training: every weight and the optimizer's states (a resumed
    run has them) resident, the tower run without gradients over `micro_batch` images."""
    pixels = step_inputs(model, cfg, micro_batch)[0]
    tracker = PeakMemory(_resident(model, optimizer, parked=False))
    with tracker, torch.no_grad(), torch.autocast(model.device.type, dtype=amp_dtype or torch.float32,
                                                  enabled=amp_dtype is not None):
        model.vision(pixels)
    return tracker.peak


def step_flops(model: VLM, optimizer: torch.optim.Optimizer, cfg: Config, micro_batch: int,
               amp_dtype: torch.dtype | None, cached: bool) -> int:
    """Floating-point operations of one training micro-step (forward, backward with any recomputation, update) at
    the longest prompts and targets, counted op by op by torch's FlopCounterMode on the fake tensors."""
    inputs = step_inputs(model, cfg, micro_batch, cached)
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, inputs, amp_dtype)
    return counter.get_total_flops()


def fill_flops(model: VLM, cfg: Config, amp_dtype: torch.dtype | None) -> int:
    """Floating-point operations of the tower on one image, as the feature cache's fill runs it."""
    pixels = step_inputs(model, cfg, 1)[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast(
            model.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        model.vision(pixels)
    return counter.get_total_flops()


def training_hours(flops: dict, cfg: Config, gpu_name: str) -> float:
    """GPU hours of `cfg`'s training at the plan's proposal: its steps' FLOPs plus the cache fill's (one tower
    pass per training example at most, data.train_size), at ASSUMED_UTILISATION of the GPU's peak; evaluation
    not counted."""
    total = flops["per_step"] * cfg.train.max_steps + flops["fill_per_image"] * (cfg.data.train_size or 0)
    return total / (GPUS[gpu_name].half_tflops * 1e12 * ASSUMED_UTILISATION) / 3600


def warm_optimizer(model: VLM) -> torch.optim.Optimizer:
    """AdamW (as `vlmlab train` makes it, fused on CUDA) with its two moment tensors per weight already made."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)  # one weight at a time, as fused AdamW
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def candidates(batch_size: int) -> list[tuple[int, bool]]:
    """(grad_accum, gradient_checkpointing) in order of preference: modest accumulation first, then
    checkpointing (about a third more compute) before micro-batches so small that the GPU idles."""
    accums = [a for a in (2**k for k in range(12)) if a <= batch_size and batch_size % a == 0]
    plain = [(a, False) for a in accums if batch_size // a >= max(1, batch_size // 4)]
    return plain + [(a, True) for a in accums] + [(a, False) for a in accums if (a, False) not in plain]


def plan(cfg: Config, gpu_name: str) -> dict:
    """Simulates `cfg`'s training step on GPU `gpu_name` for each candidate and proposes the first that fits."""
    gpu = lookup(GPUS, gpu_name, "GPU")
    amp_dtype = torch.bfloat16 if gpu.bf16 else torch.float16
    if cfg.train.precision in ("bf16", "fp16", "fp32"):
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.train.precision]
        if amp_dtype == torch.bfloat16 and not gpu.bf16:
            raise ConfigError(f"train.precision=bf16: the {gpu.name} has no bf16; use auto or fp16")
    model = build_from_architecture(cfg).train()
    cached = cache_wanted(cfg)  # steps read the tower's features, computed once before training ...
    parked = cached and cfg.train.park_tower  # ... while the tower's weights wait off the GPU
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes_per_weight = 2 if cfg.train.optimizer == "adamw8bit" else 8  # simulated: AdamW's 8
    tried, proposal = [], None
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_fake(model)  # shapes and dtypes, no memory
        optimizer = warm_optimizer(model)
        checkpointing = False
        for accum, wants_checkpointing in tqdm(candidates(cfg.train.batch_size), desc="plan", leave=False,
                                               disable=None):
            if wants_checkpointing and not checkpointing:
                enable_gradient_checkpointing([model.vision, model.language])
                checkpointing = True
            micro = cfg.train.batch_size // accum
            peak = step_peak(model, optimizer, cfg, micro, accum > 1, amp_dtype, cached, parked)
            if cached:
                peak = max(peak, fill_peak(model, optimizer, cfg, micro, amp_dtype))
            peak -= (8 - optimizer_bytes_per_weight) * trainable
            needed = peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB
            row = {"micro_batch": micro, "grad_accum": accum, "gradient_checkpointing": wants_checkpointing,
                   "peak_bytes": peak, "peak_gib": round(peak / GIB, 2), "needed_gib": round(needed / GIB, 2),
                   "fits": needed <= gpu.memory_gib * GIB}
            tried.append(row)
            if row["fits"]:
                proposal = row
                break
        chosen = proposal or tried[-1]  # its micro-batch and checkpointing are the model's state now
        flops = {"per_step": chosen["grad_accum"] * step_flops(model, optimizer, cfg, chosen["micro_batch"],
                                                               amp_dtype, cached),
                 "fill_per_image": fill_flops(model, cfg, amp_dtype) if cached else 0}
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype]
    notes = []
    fp32_modules = getattr(model.language.model, "_keep_in_fp32_modules", None)
    if cached:
        notes.append("steps read the feature cache: the tower runs once per image before training (counted)"
                     + (", its weights parked off the GPU during the steps (train.park_tower)" if parked else ""))
    if amp_dtype == torch.float16 and fp32_modules:
        notes.append(f"fp16: the LM's {', '.join(fp32_modules)} layers run in fp32, as transformers keeps them "
                     f"(their activations overflow fp16)")
    return {
        "gpu": gpu_name,
        "gpu_memory_gib": gpu.memory_gib,
        "precision": precision,
        "batch_size": cfg.train.batch_size,
        "feature_cache": cached,
        "tower_parked": parked,
        "parts": _parts(model),
        "static_gib": {
            "weights": round(sum(p.numel() * p.element_size() for p in model.parameters()) / GIB, 2),
            "gradients": round(trainable * 4 / GIB, 2),
            "optimizer_states": round(trainable * optimizer_bytes_per_weight / GIB, 2),
        },
        "notes": notes,
        "tried": tried,
        "flops": flops,
        "hours": training_hours(flops, cfg, gpu_name),
        "proposal": None if proposal is None else {
            "train.batch_size": cfg.train.batch_size,
            "train.grad_accum": proposal["grad_accum"],
            "train.gradient_checkpointing": proposal["gradient_checkpointing"],
            "train.precision": precision,
        },
    }


def _eval_lines(name: str, result: dict) -> list[str]:
    gpu, weights = GPUS[result["gpu"]], result["static_gib"]["weights"]
    needed = round(weights * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB, 2)
    verdict = "fits" if needed <= gpu.memory_gib else "does not fit"
    lines = [f"{name} on {gpu.name} ({gpu.memory_gib} GiB): evaluation only, weights as the preset loads them"]
    lines += [f"  {part:<9} {row['params_m']:8.1f}M params" for part, row in result["parts"].items()]
    lines.append(f"  weights {weights} GiB, needs {needed} GiB with the CUDA context and allocator slack (generation's "
                 f"activations not counted; an eval batch halves itself when memory runs out): {verdict}")
    lines.append(f"evaluate: vlmlab eval --model {EVAL_ONLY[name]} --data vqav2:/data/vqa data.eval_size=5000")
    return lines


def _parts(model: VLM) -> dict:
    rows = {}
    for name in ("vision", "connector", "language"):
        params = list(getattr(model, name).parameters())
        rows[name] = {"params_m": round(sum(p.numel() for p in params) / 1e6, 1),
                      "trainable_m": round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 2)}
    return rows


def plan_lines(name: str, result: dict) -> list[str]:
    """The plan as text: parts, fixed memory, each candidate tried, and the command that trains with the proposal
    (for a preset that is only evaluated: whether its weights fit, and the command that evaluates it)."""
    if name in EVAL_ONLY:
        return _eval_lines(name, result)
    gpu = GPUS[result["gpu"]]
    scaler = " with a loss scaler" if result["precision"] == "fp16" else ""
    lines = [f"{name} on {gpu.name} ({gpu.memory_gib} GiB): {result['precision']}{scaler}"]
    for part, row in result["parts"].items():
        lines.append(f"  {part:<9} {row['params_m']:8.1f}M params, {row['trainable_m']:8.2f}M trainable")
    static = result["static_gib"]
    lines.append(f"  weights {static['weights']} GiB, gradients {static['gradients']} GiB, "
                 f"optimizer states {static['optimizer_states']} GiB")
    lines += [f"  {note}" for note in result["notes"]]
    for row in result["tried"]:
        checkpointing = "gradient checkpointing" if row["gradient_checkpointing"] else "no checkpointing"
        verdict = "fits" if row["fits"] else "does not fit"
        lines.append(f"  micro-batch {row['micro_batch']:>3} x {row['grad_accum']:>2}, {checkpointing:<22} peak "
                     f"{row['peak_gib']:6.2f} GiB, needs {row['needed_gib']:6.2f} GiB: {verdict}")
    if result["proposal"] is None:
        lines.append(f"  nothing fits a {gpu.name}: use a bigger GPU, a smaller LM, shorter prompts "
                     f"(language.max_prompt_tokens) or train.optimizer=adamw8bit")
    else:
        overrides = " ".join(f"{k}={str(v).lower()}" for k, v in result["proposal"].items())
        lines.append(f"proposal: vlmlab train --preset {name} --out runs/{name} {overrides}")
    if result["proposal"] is not None:
        lines.append(f"time: about {result['hours']:.1f} GPU hours of training ({result['flops']['per_step'] / 1e12:.1f}"
                     f" TFLOP a step; at {ASSUMED_UTILISATION:.0%} of the {gpu.half_tflops:g} TFLOPS half-precision "
                     f"peak, an assumption good to about 2x; evaluation not counted)")
    return lines

