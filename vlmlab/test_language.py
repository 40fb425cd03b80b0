"""The conditioning contract: what the LM is trained on, position by position."""

import pytest
import torch

from vlmlab.config import ConfigError, LanguageConfig
from vlmlab.language import IGNORE_INDEX, SHORT_TARGET_TOKENS, build_language
from vlmlab.tokenizer import train_tokenizer

TEXTS = ["what color is the circle?", "red", "blue", "a large red circle and a small blue square", "yes", "no"]
M = 3  # visual tokens


def tiny_lm(family: str, pad_is_eos: bool = False):
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    if pad_is_eos:  # GPT-2's situation: no pad token of its own
        tokenizer.pad_token = tokenizer.eos_token
    return build_language(LanguageConfig(family=family, hidden_size=32, num_layers=1, num_heads=2), tokenizer)


def batch(lm):
    prompts = lm.encode_prompts(["Question: what color is the circle? Answer:", "A short caption:"])
    targets = lm.encode_targets(["red", "a large red circle and a small blue square"])
    visual = torch.randn(2, M, lm.hidden_size)
    return visual, prompts, targets


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_eos_appended_exactly_once(family):
    lm = tiny_lm(family)
    for row in lm.encode_targets(["red", "a large red circle", ""]):
        assert row[-1] == lm.eos_id and row.count(lm.eos_id) == 1


def test_encoder_decoder_labels_and_masks():
    lm = tiny_lm("t5")
    visual, prompts, targets = batch(lm)
    inputs = lm.training_inputs(visual, prompts, targets)
    labels, mask = inputs["labels"], inputs["attention_mask"]
    # Labels: each target exactly, then IGNORE_INDEX padding (never the pad id).
    for i, target in enumerate(targets):
        assert labels[i, : len(target)].tolist() == target
        assert (labels[i, len(target):] == IGNORE_INDEX).all()
    # Encoder mask: every visual token and every prompt token, no padding.
    for i, prompt in enumerate(prompts):
        assert mask[i, :M].all() and mask[i].sum() == M + len(prompt)
    assert inputs["inputs_embeds"].shape[1] == M + max(len(p) for p in prompts)


@pytest.mark.parametrize("family,pad_is_eos", [("gpt2", True), ("gpt2", False), ("llama", False)])
def test_decoder_only_labels_only_on_answers(family, pad_is_eos):
    lm = tiny_lm(family, pad_is_eos)
    visual, prompts, targets = batch(lm)
    inputs = lm.training_inputs(visual, prompts, targets)
    labels, mask = inputs["labels"], inputs["attention_mask"]
    length = labels.shape[1]
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        used = M + len(prompt) + len(target)
        pad = length - used  # left padding
        assert (labels[i, :pad] == IGNORE_INDEX).all(), "padding is never trained (even when pad == EOS)"
        assert (labels[i, pad : pad + M + len(prompt)] == IGNORE_INDEX).all(), "visual and prompt are not trained"
        assert labels[i, pad + M + len(prompt):].tolist() == target
        assert mask[i, :pad].sum() == 0 and mask[i, pad:].all(), "the mask covers visual tokens, not padding"
        positions = inputs["position_ids"][i, pad:]
        assert positions.tolist() == list(range(used))
    # Exactly one trained EOS per example, whatever the pad id is.
    assert int((labels == lm.eos_id).sum()) == len(targets)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_loss_ignores_padding_content(family):
    """Changing how long the other example is (hence the padding) leaves an example's loss unchanged."""
    torch.manual_seed(0)
    lm = tiny_lm(family).eval()
    visual, prompts, targets = batch(lm)
    alone = lm.loss(visual[:1], prompts[:1], targets[:1])
    inputs = lm.training_inputs(visual, prompts, targets)
    logits = lm.model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=inputs["labels"]).logits
    shift = 0 if lm.is_encoder_decoder else 1  # causal LMs predict the next position
    row_logits = logits[0, : logits.shape[1] - shift]
    row_labels = inputs["labels"][0, shift:]
    together = torch.nn.functional.cross_entropy(row_logits, row_labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(alone, together, atol=1e-5)


def _with(lm, **fields):
    for name, value in fields.items():
        setattr(lm, name, value)
    return lm


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_eos_loss_weight_scales_only_the_eos_terms(family):
    torch.manual_seed(0)
    lm = tiny_lm(family).eval()
    visual, prompts, targets = batch(lm)
    plain = lm.loss(visual, prompts, targets)
    assert torch.allclose(_with(lm, eos_loss_weight=1.0).loss(visual, prompts, targets), plain)
    none, half, full = (_with(lm, eos_loss_weight=w).loss(visual, prompts, targets) for w in (0.0, 0.5, 1.0))
    assert none < full, "EOS terms removed"
    assert torch.allclose(half, (none + full) / 2, atol=1e-6), "linear in the weight, same normaliser"
    # Full weight through our own cross-entropy equals transformers' loss.
    lm.eos_loss_weight = 0.999999
    assert torch.allclose(lm.loss(visual, prompts, targets), plain, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_padding_trained_as_eos_only_when_asked(family):
    lm = tiny_lm(family, pad_is_eos=True)
    answers = ["red", "a large red circle and a small blue square"]
    plain = lm.encode_answers(answers)
    assert lm.encode_targets(answers) == plain and [row.count(lm.eos_id) for row in plain] == [1, 1]
    lm.train_padding_as_eos = True  # the reproduction switch: left-padded with EOS, every position trained
    rows = lm.encode_targets(answers)
    short = len(plain[1]) - len(plain[0])
    assert rows == [[lm.eos_id] * short + plain[0], plain[1]], "the shorter answer now starts with EOS"
    visual, prompts, _ = batch(lm)
    labels = lm.training_inputs(visual, prompts, rows)["labels"]
    assert int((labels == lm.eos_id).sum()) == short + 2


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_length_buckets_give_the_unbucketed_mean_loss(family):
    """Short answers and long captions run apart, yet the loss is the mean over all answer tokens of the batch."""
    torch.manual_seed(0)
    lm = tiny_lm(family).eval()
    visual, prompts, targets = batch(lm)
    assert len(targets[0]) <= SHORT_TARGET_TOKENS < len(targets[1]), "the batch must span both buckets"
    reference = lm.model(**lm.training_inputs(visual, prompts, targets)).loss  # transformers' own loss
    assert torch.allclose(lm.loss(visual, prompts, targets), reference, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_neftune_noises_the_text_embeddings_in_training_only_within_its_bound(family):
    torch.manual_seed(0)
    lm = _with(tiny_lm(family), neftune_alpha=5.0)
    visual, prompts, _ = batch(lm)
    lm.train()
    noisy = lm._rows(visual, prompts)
    lm.eval()
    clean = lm._rows(visual, prompts)
    for noisy_row, clean_row, tokens in zip(noisy, clean, prompts):
        if lm.fusion is None:  # the visual tokens lead the row and get no noise
            assert torch.equal(noisy_row[:M], clean_row[:M])
        text_noise = (noisy_row - clean_row)[-len(tokens):]  # [L, D]
        bound = 5.0 / (len(tokens) * lm.hidden_size) ** 0.5
        assert 0 < text_noise.abs().max() <= bound * (1 + 1e-5)
        assert text_noise.abs().mean() > bound / 4  # uniform on [-a, a]: mean |noise| is a / 2
    lm.train()
    assert not torch.equal(lm._rows(visual, prompts)[0], noisy[0])  # fresh noise every step
    off = _with(tiny_lm(family), neftune_alpha=0.0).train()
    assert all(torch.equal(a, b) for a, b in zip(off._rows(visual, prompts), off.eval()._rows(visual, prompts)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_on_all_text_trains_the_prompt_tokens_too(family):
    torch.manual_seed(0)
    lm = tiny_lm(family).eval()
    visual, prompts, targets = batch(lm)
    labels = lm.training_inputs(visual, prompts, targets, all_text=True)["labels"]
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        trained = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert trained == prompt + target  # every text token; padding and the visual tokens never
    answers_only = lm.loss(visual, prompts, targets)
    everything = _with(lm, loss_on_all_text=True).loss(visual, prompts, targets)
    summed = lm.answer_losses(visual, prompts, targets, all_text=True).sum()
    assert torch.allclose(everything, summed / sum(len(p) + len(t) for p, t in zip(prompts, targets)))
    assert not torch.allclose(everything, answers_only)
    # what evaluation and diagnosis score (answer_losses as they call it) stays the answer alone in this mode
    scored = lm.answer_losses(visual, prompts, targets).sum() / sum(len(t) for t in targets)
    assert lm.loss_on_all_text and torch.allclose(scored, answers_only)


def test_loss_on_all_text_is_refused_for_an_encoder_decoder():
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    with pytest.raises(ConfigError, match="language.loss_on='all' is not allowed with an encoder-decoder LM"):
        build_language(LanguageConfig(family="t5", hidden_size=32, num_layers=1, num_heads=2, loss_on="all"),
                       tokenizer)
