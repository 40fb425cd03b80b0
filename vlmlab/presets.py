"""Named presets: plain functions returning a full `Config`. `vlmlab presets` lists them with their first doc line.

Two kinds: tiny ones built from scratch for the synthetic world (CPU, minutes, no network), and the recipes of
the seed at their real size, which load pretrained parts from the hub and train on a real dataset (a Colab GPU;
`vlmlab plan --preset NAME --gpu t4` says whether and how each fits). Every part can still be swapped by
override: `vision.model=` and `language.model=` take a hub name or a local path.
"""

from __future__ import annotations

from vlmlab.blip2 import checkpoint_config
from vlmlab.config import Config, ConnectorConfig
from vlmlab.registry import lookup


def default() -> Config:
    """Tiny ResNet -> MLP (64 visual tokens) -> tiny T5, from scratch on the synthetic world; CPU, minutes."""
    cfg = Config()
    # A convnet learns the 11-px shapes and the words in a few hundred steps where a tiny ViT of the same cost is
    # still at chance; 2 stages turn 64 px into an 8 x 8 map (64 features), one per 8-px cell.
    cfg.vision.family = "resnet"
    cfg.vision.num_layers = 2
    # One token per cell, each with a learned position: the T5 encoder finds the object a question names. A
    # 16-query Q-Former trained from scratch alongside lost the shapes and the words (README, what was tried).
    cfg.connector.kind = "mlp"
    cfg.train.lr = 1e-3
    cfg.train.max_steps = 1500  # ~400 s on 2 cores: 0.91 VQA accuracy (1000 steps: 0.89)
    return cfg


def tiny_qformer() -> Config:
    """The seed's connector in tiny: tiny CLIP-style ViT -> Q-Former (16 queries) -> tiny T5, synthetic world."""
    return Config()


def tiny_gpt2() -> Config:
    """The seed's decoder-only layout in tiny: tiny ViT -> Q-Former -> tiny GPT-2 (visual prefix), synthetic world."""
    cfg = Config()
    cfg.language.family = "gpt2"
    return cfg


def tiny_llama() -> Config:
    """Tiny ViT -> Q-Former -> tiny Llama-style causal LM (visual prefix), synthetic world."""
    cfg = Config()
    cfg.language.family = "llama"
    return cfg


def recommended() -> Config:
    """The seed's recipe: CLIP ViT-L/14 frozen -> Q-Former 64 queries -> linear -> Flan-T5-base LoRA, VQAv2 40k."""
    cfg = Config()
    cfg.vision.model = "openai/clip-vit-large-patch14"
    cfg.vision.train = "frozen"  # the seed: a frozen tower is enough and half the parameters stay out of training
    cfg.vision.feature_layer = -2  # the penultimate layer: less specialised to CLIP's contrastive objective
    # A BERT-base-wide Q-Former of half BLIP-2's depth, trained from scratch; its output projection is the seed's
    # "linear projection" into Flan-T5's 768-wide embedding space.
    cfg.connector.kind = "qformer"
    cfg.connector.num_queries = 64  # the seed: more queries help VQA (32 suffice for captions)
    cfg.connector.hidden_size = 768
    cfg.connector.num_layers = 6
    cfg.connector.num_heads = 12
    cfg.connector.dropout = 0.1
    cfg.language.model = "google/flan-t5-base"
    cfg.language.train = "lora"  # rank 16 on q, k, v, o of every attention block (tuning.py)
    cfg.language.max_prompt_tokens = 48
    cfg.language.max_target_tokens = 12  # VQA answers are a few words; EOS included
    cfg.data.train = "vqav2"
    cfg.data.eval = "vqav2"
    cfg.data.train_size = 40_000  # the seed: a VQAv2 subset of 20k-50k questions
    cfg.data.eval_size = 5_000
    cfg.data.captions = False
    cfg.data.prompt = "Question: {question} Answer:"
    cfg.train.batch_size = 32
    cfg.train.lr = 1e-4
    cfg.train.warmup_steps = 200
    cfg.train.max_steps = 3750  # three passes over 40k questions at 32 per step
    cfg.train.precision = "auto"  # bf16 where the GPU has it (L4, A100), else fp16 with a loss scaler (T4)
    cfg.train.eval_every = 500
    cfg.train.save_every = 500
    cfg.train.eval_examples = 512
    cfg.eval.max_new_tokens = 10  # the seed: answers of at most 5-10 new tokens
    cfg.eval.batch_size = 64
    cfg.eval.caption_metrics = False
    return cfg


def recommended_t5_small() -> Config:
    """The recommended recipe with Flan-T5-small (77M) as the LM: lighter, for a quick first run."""
    cfg = recommended()
    cfg.language.model = "google/flan-t5-small"
    return cfg


def recommended_t5_large() -> Config:
    """The recommended recipe with Flan-T5-large (783M) as the LM: `plan` says how it fits."""
    cfg = recommended()
    cfg.language.model = "google/flan-t5-large"
    return cfg


def recommended_32_queries() -> Config:
    """The recommended recipe with 32 Q-Former queries instead of 64 (the seed's query-count experiment)."""
    cfg = recommended()
    cfg.connector.num_queries = 32
    return cfg


def recommended_siglip() -> Config:
    """The recommended recipe with SigLIP-base/16 (224 px) as the frozen vision tower instead of CLIP ViT-L/14."""
    cfg = recommended()
    cfg.vision.model = "google/siglip-base-patch16-224"
    return cfg


def recommended_smollm2() -> Config:
    """The recommended recipe with a modern decoder-only LM: SmolLM2-135M-Instruct with LoRA (visual prefix)."""
    cfg = recommended()
    cfg.language.model = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Llama-style: LoRA on q/k/v/o_proj
    return cfg


def seed_gpt2_captions() -> Config:
    """The seed's failed baseline, conditioning fixed: CLIP ViT-B/32 -> Q-Former 32 -> GPT-2 in full, Flickr8k."""
    cfg = Config()
    cfg.vision.model = "openai/clip-vit-base-patch32"
    cfg.vision.train = "frozen"
    cfg.connector.kind = "qformer"
    cfg.connector.num_queries = 32
    cfg.connector.hidden_size = 768
    cfg.connector.num_layers = 6
    cfg.connector.num_heads = 12
    cfg.connector.dropout = 0.1
    cfg.language.model = "gpt2"
    cfg.language.train = "full"  # as the seed had it; its empty captions came from the conditioning, fixed here
    cfg.language.max_prompt_tokens = 16
    cfg.language.max_target_tokens = 40
    cfg.data.train = "flickr8k"
    cfg.data.eval = "flickr8k"
    cfg.data.caption_prompt = "A short caption:"
    cfg.train.batch_size = 32
    cfg.train.lr = 5e-5
    cfg.train.warmup_steps = 200
    cfg.train.max_steps = 2000  # about 2 passes over Flickr8k's 30k training captions
    cfg.train.eval_every = 500
    cfg.train.save_every = 500
    cfg.eval.caption_max_new_tokens = 32
    cfg.eval.batch_size = 64
    return cfg


# The smallest published BLIP-2 / InstructBLIP with Flan-T5 (there is no -base: Flan-T5-XL and -XXL, OPT-2.7B and
# -6.7B for BLIP-2, Vicuna-7B and -13B for InstructBLIP): 3.9B and 4.0B parameters, 32 queries of 768.
BLIP2_XL = "Salesforce/blip2-flan-t5-xl"
INSTRUCTBLIP_XL = "Salesforce/instructblip-flan-t5-xl"


def _pretrained_qformer(kind: str, init: str, dropout: float) -> ConnectorConfig:
    """The published checkpoints' Q-Former: BERT-base (12 layers of 768, 12 heads), cross-attention every 2nd."""
    return ConnectorConfig(kind=kind, num_queries=32, hidden_size=768, num_layers=12, num_heads=12, dropout=dropout,
                           cross_attention_every=2, init=init)


def _vqav2(cfg: Config) -> Config:
    """The recommended recipe's data, training and evaluation around `cfg`'s parts and prompts."""
    recipe = recommended()
    cfg.data.train, cfg.data.eval = recipe.data.train, recipe.data.eval
    cfg.data.train_size, cfg.data.eval_size, cfg.data.captions = recipe.data.train_size, recipe.data.eval_size, False
    cfg.train, cfg.eval.batch_size, cfg.eval.caption_metrics = recipe.train, recipe.eval.batch_size, False
    cfg.language.max_target_tokens = recipe.language.max_target_tokens
    return cfg


def blip2_as_is() -> Config:
    """Evaluation only: BLIP-2 Flan-T5-XL as published (its prompt, beam 5), fp16; `vlmlab eval --model` it."""
    cfg = _vqav2(checkpoint_config(BLIP2_XL, _pretrained_qformer("blip2", BLIP2_XL, 0.0), dtype="fp16"))
    cfg.train.feature_cache = "off"  # nothing is trained: no tower features to keep
    return cfg


def instructblip_finetune() -> Config:
    """InstructBLIP Flan-T5-XL trained further: ViT frozen (fp16), Q-Former trained, Flan-T5-XL LoRA (fp16 base)."""
    cfg = _vqav2(checkpoint_config(INSTRUCTBLIP_XL, _pretrained_qformer("instructblip", INSTRUCTBLIP_XL, 0.1),
                                   dtype="fp16"))
    cfg.language.train = "lora"
    cfg.train.lr = 2e-5  # a fifth of the recommended recipe's, whose Q-Former starts from nothing
    return cfg


def recommended_pretrained_qformer() -> Config:
    """The recommended recipe with BLIP-2's pretrained Q-Former (32 queries; new cross-attention inputs for CLIP-L)."""
    cfg = recommended()
    cfg.connector = _pretrained_qformer("blip2", BLIP2_XL, 0.1)
    return cfg


# Evaluated as published, never trained by vlmlab: `vlmlab train` refuses them, naming the command that evaluates.
EVAL_ONLY = {"blip2-as-is": BLIP2_XL}
# Built from scratch, no network: the synthetic world on a CPU.
TINY_PRESETS = {"default": default, "tiny-qformer": tiny_qformer, "tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}
# Pretrained parts from the hub at their real size, real datasets: a GPU.
REAL_PRESETS = {
    "recommended": recommended,
    "recommended-t5-small": recommended_t5_small,
    "recommended-t5-large": recommended_t5_large,
    "recommended-32-queries": recommended_32_queries,
    "recommended-siglip": recommended_siglip,
    "recommended-smollm2": recommended_smollm2,
    "seed-gpt2-captions": seed_gpt2_captions,
    "blip2-as-is": blip2_as_is,
    "instructblip-finetune": instructblip_finetune,
    "recommended-pretrained-qformer": recommended_pretrained_qformer,
}
PRESETS = {**TINY_PRESETS, **REAL_PRESETS}


def get_preset(name: str) -> Config:
    return lookup(PRESETS, name, "preset")()


def describe_presets() -> list[str]:
    width = max(len(name) for name in PRESETS)
    return [f"{name:<{width}}  {builder.__doc__.splitlines()[0]}" for name, builder in PRESETS.items()]
