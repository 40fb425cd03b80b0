"""The language part: visual tokens + prompt -> text, with the loss on the answer tokens only.

Two kinds of `transformers` LM sit behind one contract, chosen by the checkpoint's own `is_encoder_decoder` flag:
- encoder-decoder (T5, Flan-T5): the encoder reads [visual tokens; prompt]; the decoder is trained on the answer.
- decoder-only (GPT-2, Llama-style): one sequence [visual tokens; prompt; answer], left-padded, the visual tokens
  as a prefix, the loss only on the answer; or, with `language.fusion=cross_attention`, [prompt; answer] with gated
  cross-attention blocks into the visual tokens (fusion.py).

Conditioning is right by construction, whatever the tokenizer: labels are built from each example's lengths,
never by comparing ids with the pad id, so padding is never trained as EOS even when pad == EOS (GPT-2); EOS is
appended exactly once to each target; the attention mask covers every visual token and no padding. The one
exception is asked for by name: `language.train_padding_as_eos`, a switch that exists only to reproduce the
empty-caption failure (docs/experiments/conditioning.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)

from vlmlab.blip2 import family_of, load_part
from vlmlab.config import ConfigError, LanguageConfig
from vlmlab.fusion import FUSION_FILE, build_fusion
from vlmlab.loading import WEIGHT_DTYPES, pretrained_config, pretrained_model, pretrained_tokenizer
from vlmlab.registry import lookup

IGNORE_INDEX = -100  # label value the loss skips
SHORT_TARGET_TOKENS = 8  # answers up to this length (EOS included) are batched apart from longer targets


def _tiny_t5(cfg: LanguageConfig, tokenizer) -> nn.Module:
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.hidden_size,
            d_kv=cfg.hidden_size // cfg.num_heads,
            d_ff=4 * cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout_rate=0.0,  # a tiny model trained from scratch underfits; dropout only slows it
            feed_forward_proj="gated-gelu",  # Flan-T5's feed-forward
            # Tied input/output embeddings: T5 then scales the decoder output by d_model**-0.5, which keeps the
            # first logits of a from-scratch model small (untied, the initial loss is ~60 instead of ~log(vocab)).
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_gpt2(cfg: LanguageConfig, tokenizer) -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_positions=512,
            resid_pdrop=0.0,  # a tiny model trained from scratch underfits; dropout only slows it
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_llama(cfg: LanguageConfig, tokenizer) -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=4 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=512,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


TINY_FAMILIES = {"t5": _tiny_t5, "gpt2": _tiny_gpt2, "llama": _tiny_llama}


def _pad_stack(rows: list[torch.Tensor], pad_value, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks rows of different lengths `[Li, ...]` into `[B, L, ...]` plus a mask `[B, L]` of real positions."""
    length = max(row.shape[0] for row in rows)
    stacked = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), pad_value)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        span = slice(length - row.shape[0], length) if left else slice(0, row.shape[0])
        stacked[i, span] = row
        mask[i, span] = 1
    return stacked, mask


def _neftune(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune's noise on one sequence's text embeddings `[L, D]`: uniform in [-a, a], a = alpha / sqrt(L * D)."""
    bound = alpha / math.sqrt(embeddings.numel()) if embeddings.numel() else 0.0
    return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)


def _fp32_under_fp16_autocast(forward: Callable) -> Callable:
    def run(hidden: torch.Tensor, *args, **kwargs):
        device = hidden.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
            with torch.autocast(device, enabled=False):
                return forward(hidden.float(), *args, **kwargs)
        return forward(hidden, *args, **kwargs)

    return run


def keep_fp32_modules(model: nn.Module) -> None:
    """Runs the modules transformers lists in `_keep_in_fp32_modules` in fp32 whenever fp16 autocast is on.

    Why: T5's feed-forward output projection `wo` produces activations beyond fp16's range (65504) in the
    pretrained Flan-T5 checkpoints, so fp16 training on a T4 turns them into inf and the loss into NaN.
    transformers keeps those weights in fp32 when a model is loaded in fp16, but under autocast a Linear still
    computes in fp16 whatever its weight's dtype; so their forward runs with autocast off, on fp32 inputs.
    bf16 has fp32's range and needs none of this. The forward is replaced on the instance: the weights, their
    names and `save_pretrained` stay exactly transformers'.
    """
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in names:
            module.forward = _fp32_under_fp16_autocast(module.forward)


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: LanguageConfig):
        super().__init__()
        keep_fp32_modules(model)
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = cfg.max_prompt_tokens
        self.max_target_tokens = cfg.max_target_tokens
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.eos_id = tokenizer.eos_token_id
        self.eos_loss_weight = cfg.eos_loss_weight
        self.train_padding_as_eos = cfg.train_padding_as_eos
        self.neftune_alpha = cfg.neftune_alpha
        self.loss_on_all_text = cfg.loss_on == "all"
        if self.loss_on_all_text and self.is_encoder_decoder:
            raise ConfigError("language.loss_on='all' is not allowed with an encoder-decoder LM: it reads the prompt "
                              "in its encoder, where no token is predicted (answer trains what it can)")
        self.fusion = build_fusion(cfg.fusion, model, cfg.cross_attention_every, self.is_encoder_decoder)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    # -- text -> ids -------------------------------------------------------------------------------------------
    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # T5's encoder was trained on inputs closed by EOS; a causal LM's prompt runs straight into the answer.
        closing = [self.eos_id] if self.is_encoder_decoder else []
        return [row[: self.max_prompt_tokens - len(closing)] + closing for row in ids]

    def prompt_length(self, text: str) -> int:
        """Tokens the LM would read for prompt `text` if nothing were cut (a T5 encoder's closing EOS included)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + int(self.is_encoder_decoder)

    def fit_question(self, question: str, render: Callable[[str], str]) -> str:
        """The longest start of `question` whose prompt `render(question)` fits in `max_prompt_tokens`.

        Cutting whole characters (not tokens) keeps every script intact, and cutting the question rather than the
        prompt keeps the instruction's closing words ("Answer:") that the answer follows.
        """
        if self.prompt_length(render(question)) <= self.max_prompt_tokens:
            return question
        fits, too_long = 0, len(question)  # binary search on the number of characters kept
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            if self.prompt_length(render(question[:middle])) <= self.max_prompt_tokens:
                fits = middle
            else:
                too_long = middle
        return question[:fits]

    def encode_answers(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row[: self.max_target_tokens - 1] + [self.eos_id] for row in ids]  # EOS exactly once

    def encode_targets(self, texts: list[str]) -> list[list[int]]:
        """The training targets: the answers, unless `train_padding_as_eos` (reproduction only) pads them on the
        left with EOS to the batch's longest, as a tokenizer with padding_side="left" and pad == EOS does, every
        padding position trained: the shorter answers then begin with EOS."""
        rows = self.encode_answers(texts)
        if self.train_padding_as_eos:
            longest = max(map(len, rows), default=0)
            return [[self.eos_id] * (longest - len(row)) + row for row in rows]
        return rows

    def answer_tokens(self, targets: list[str]) -> int:
        """How many tokens the loss of a batch with these targets is averaged over (EOS included)."""
        return sum(len(row) for row in self.encode_targets(targets))

    # -- sequences ---------------------------------------------------------------------------------------------
    def prefix_length(self, visual: torch.Tensor) -> int:
        """How many visual tokens lead each sequence: all M of them, or none with cross-attention fusion."""
        return 0 if self.fusion is not None else visual.shape[1]

    def _rows(self, visual: torch.Tensor, token_rows: list[list[int]]) -> list[torch.Tensor]:
        """[visual_i; embed(tokens_i)] per example: `[M + Ti, D]` (`[Ti, D]` with cross-attention fusion)."""
        embed = self.model.get_input_embeddings()
        if embed.weight.dtype != torch.float32:  # an LM kept in half precision (language.dtype) reads its own dtype
            visual = visual.to(embed.weight.dtype)
        flat = torch.tensor([t for row in token_rows for t in row], dtype=torch.long, device=visual.device)
        pieces = [piece.to(visual.dtype) for piece in embed(flat).split([len(row) for row in token_rows])]
        if self.training and self.neftune_alpha > 0:
            pieces = [_neftune(piece, self.neftune_alpha) for piece in pieces]
        if self.fusion is not None:
            return pieces
        return [torch.cat([visual[i], piece]) for i, piece in enumerate(pieces)]

    def _inputs(self, visual: torch.Tensor, token_rows: list[list[int]]) -> dict:
        """Model inputs for [visual; tokens] rows: right-padded for the encoder, left-padded for a causal LM."""
        left = not self.is_encoder_decoder
        embeds, mask = _pad_stack(self._rows(visual, token_rows), 0.0, left=left)
        inputs = {"inputs_embeds": embeds, "attention_mask": mask}
        if left:  # positions count real tokens only, as generation counts them
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    def training_inputs(self, visual: torch.Tensor, prompts: list[list[int]], targets: list[list[int]],
                        all_text: bool = False) -> dict:
        """The LM's keyword arguments for a training batch, `labels` included; visual `[B, M, D]`. `all_text`
        (decoder-only): the prompt's tokens are labels too, the first predicted from the visual tokens."""
        device = visual.device
        if self.is_encoder_decoder:
            labels, _ = _pad_stack([torch.tensor(t, device=device) for t in targets], IGNORE_INDEX, left=False)
            return {**self._inputs(visual, prompts), "labels": labels}
        # One sequence per example; labels are the answer ids (with all_text, the prompt's too) at their positions
        # and IGNORE_INDEX elsewhere.
        label_rows = [
            torch.tensor([IGNORE_INDEX] * self.prefix_length(visual) + (p if all_text else [IGNORE_INDEX] * len(p))
                         + t, device=device)
            for p, t in zip(prompts, targets)
        ]
        labels, _ = _pad_stack(label_rows, IGNORE_INDEX, left=True)
        return {**self._inputs(visual, [p + t for p, t in zip(prompts, targets)]), "labels": labels}

    def _run(self, visual: torch.Tensor, inputs: dict, **options):
        if self.fusion is not None:
            self.fusion.attend_to(visual)
        return self.model(**inputs, **options)

    def forward(self, visual: torch.Tensor, prompts: list[list[int]], targets: list[list[int]], **options):
        """The transformers output for a training batch: logits, loss, and what `options` ask for (attentions)."""
        return self._run(visual, self.training_inputs(visual, prompts, targets), **options)

    def answer_losses(self, visual: torch.Tensor, prompts: list[list[int]], targets: list[list[int]],
                      all_text: bool = False) -> torch.Tensor:
        """Summed cross-entropy of each example's answer tokens (with `all_text`, its prompt's too), EOS counted
        `eos_loss_weight` times: `[B]`."""
        inputs = self.training_inputs(visual, prompts, targets, all_text)
        labels = inputs.pop("labels")  # [B, T]
        if self.is_encoder_decoder:  # the decoder reads the labels shifted right, starting at its start token
            inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self._run(visual, inputs).logits  # [B, T, V]
        if not self.is_encoder_decoder:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        if self.eos_loss_weight != 1.0:
            losses = losses * torch.where(labels == self.eos_id, self.eos_loss_weight, 1.0)
        return losses.sum(dim=1)

    def loss(self, visual: torch.Tensor, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of the batch (language.loss_on=all: over its prompt tokens too),
        EOS included and counted `eos_loss_weight` times (the divisor stays the number of those tokens: only EOS's
        share changes).

        Rows run in two length buckets (short answers, long captions) that share the visual tokens: padding a
        three-token answer to a caption's length would make most of the LM's work padding.
        """
        short = [i for i, t in enumerate(targets) if len(t) <= SHORT_TARGET_TOKENS]
        long = [i for i, t in enumerate(targets) if len(t) > SHORT_TARGET_TOKENS]
        total = visual.new_zeros((), dtype=torch.float32)
        for rows in (short, long):
            if rows:
                index = torch.tensor(rows, device=visual.device)
                picked = visual[index]  # [b, M, D]
                total = total + self.answer_losses(picked, [prompts[i] for i in rows], [targets[i] for i in rows],
                                                   self.loss_on_all_text).sum()
        predicted = sum(len(t) + (len(p) if self.loss_on_all_text else 0) for p, t in zip(prompts, targets))
        return total / max(predicted, 1)

    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        prompts: list[list[int]],
        max_new_tokens: int,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        streamer=None,
    ) -> list[str]:
        ids = self.generate_ids(visual, prompts, max_new_tokens, min_new_tokens, num_beams, streamer)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(self, visual: torch.Tensor, prompts: list[list[int]], max_new_tokens: int,
                     min_new_tokens: int = 0, num_beams: int = 1, streamer=None) -> torch.Tensor:
        """The raw ids `generate` decodes `[B, T]`: the new tokens (a decoder-only LM fed embeddings returns only
        those; an encoder-decoder's start with its decoder start token), EOS and padding included. `streamer`: a
        transformers streamer (e.g. `TextIteratorStreamer`) handed each new token as it is generated; batch size 1
        and num_beams=1 only, as transformers requires."""
        inputs = self._inputs(visual, prompts)
        inputs.pop("position_ids", None)  # generate derives them from the attention mask
        if self.fusion is not None:
            self.fusion.attend_to(visual)
        return self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
        )

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.fusion is not None:
            state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.fusion.state_dict().items()}
            save_file(state, Path(directory) / FUSION_FILE)


def load_pretrained(name: str, trust_remote_code: bool = False, revision: str = "",
                    dtype: torch.dtype = torch.float32, gguf_file: str = "") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A hub name or local path (at hub `revision`; from its GGUF file `gguf_file` if given) -> (LM, tokenizer);
    the LM class follows the checkpoint's config."""
    config = pretrained_config("language.model", name, trust_remote_code, revision, gguf_file)
    tokenizer = pretrained_tokenizer("language.model", name, trust_remote_code, revision, gguf_file)
    if tokenizer.pad_token is None:
        # GPT-2 ships no pad token. Reusing EOS is harmless here: labels never come from comparing ids with pad.
        tokenizer.pad_token = tokenizer.eos_token
    if family_of(config) is not None:  # a whole BLIP-2 / InstructBLIP checkpoint: its LM and tokenizer
        return load_part(config, "language", "language.model", name, trust_remote_code, revision, dtype), tokenizer
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return pretrained_model(model_class, "language.model", name, trust_remote_code, revision, gguf_file,
                            dtype=dtype), tokenizer


def build_language(cfg: LanguageConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> LanguageModel:
    """Loads `cfg.model`, or builds a tiny LM of `cfg.family` around `tokenizer` (trained on the data)."""
    if cfg.model:
        model, tokenizer = load_pretrained(cfg.model, cfg.trust_remote_code, cfg.revision, WEIGHT_DTYPES[cfg.dtype],
                                           cfg.gguf_file)
    else:
        if tokenizer is None:
            raise ValueError("a tiny language model needs a tokenizer trained on the data")
        model = lookup(TINY_FAMILIES, cfg.family, "tiny language family")(cfg, tokenizer).to(WEIGHT_DTYPES[cfg.dtype])
    language = LanguageModel(model, tokenizer, cfg)
    saved_fusion = Path(cfg.model) / FUSION_FILE if cfg.model else None
    if language.fusion is not None and saved_fusion is not None and saved_fusion.is_file():
        language.fusion.load_state_dict(load_file(saved_fusion))  # strict: every block's weights, or an error
    return language
