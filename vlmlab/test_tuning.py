"""Tuning modes: which modules each family's LoRA/DoRA adapts, what trains, merging, checkpointing, saving."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5ForConditionalGeneration,
)

from vlmlab.config import Config, ConfigError, LanguageConfig, VisionConfig, apply_overrides
from vlmlab.loading import CheckpointError
from vlmlab.train import make_optimizer
from vlmlab.tuning import (
    OWN_WEIGHTS,
    apply_tuning,
    check_modes,
    enable_gradient_checkpointing,
    load_reference,
    merge_adapter,
    save_reference,
)

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
           patch_size=8)


def t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                               num_heads=2, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                               decoder_start_token_id=0))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1))


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                        eos_token_id=1, pad_token_id=0))


FAMILIES = {
    "t5": t5,
    "gpt2": gpt2,
    "llama": llama,
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**VIT)),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**VIT)),
}
ATTENTION = {
    "t5": {f"{block}.{name}" for block in ("SelfAttention", "EncDecAttention") for name in "qkvo"},
    "gpt2": {"attn.c_attn", "attn.c_proj"},
    "llama": {f"self_attn.{name}_proj" for name in "qkvo"},
    "clip": {f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "siglip": {f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
}
MLP = {
    "t5": {"DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "clip": {"mlp.fc1", "mlp.fc2"},
    "siglip": {"mlp.fc1", "mlp.fc2"},
}


class Part(nn.Module):
    """What apply_tuning works on: a part whose `.model` is the transformers model (plus, here, a module of its own)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.own = nn.Linear(4, 4)


def section(mode: str, targets: str = "attention", rank: int = 4):
    return LanguageConfig(model="some/checkpoint", train=mode, lora_rank=rank, lora_alpha=8, lora_dropout=0.0,
                          lora_targets=targets)


def adapted(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted modules by the last two parts of their path (e.g. `SelfAttention.q`)."""
    found = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            found.setdefault(".".join(path.split(".")[-2:]), []).append(module)
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", ["attention", "attention+mlp"])
def test_each_family_adapts_its_attention_and_feed_forward_layers(family, targets):
    torch.manual_seed(0)
    part = Part(FAMILIES[family]())
    apply_tuning(part, section("lora", targets), "language")
    found = adapted(part.model)
    assert set(found) == ATTENTION[family] | (MLP[family] if targets == "attention+mlp" else set())
    assert all(len(modules) >= 2 for modules in found.values())  # every layer, not just one
    # Only the adapters train; each adds r * (in + out) weights.
    trainable = {name for name, p in part.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    expected = sum(4 * sum(m.lora_A["default"].weight.shape[1:]) + 4 * m.lora_B["default"].weight.shape[0]
                   for modules in found.values() for m in modules)
    assert sum(p.numel() for p in part.model.parameters() if p.requires_grad) == expected


def test_gpt2_conv1d_layers_are_adapted_as_transposed_linears():
    part = Part(gpt2())
    apply_tuning(part, section("lora"), "language")
    assert all(m.fan_in_fan_out for modules in adapted(part.model).values() for m in modules)


def test_siglip_pooling_head_is_left_alone():
    part = Part(FAMILIES["siglip"]())
    apply_tuning(part, section("lora", "attention+mlp"), "vision")
    assert not any(".head." in path for path, m in part.model.named_modules() if hasattr(m, "lora_A"))


def test_named_targets_and_their_errors():
    part = Part(t5())
    apply_tuning(part, section("lora", "q, v"), "language")
    assert set(adapted(part.model)) == {"SelfAttention.q", "SelfAttention.v", "EncDecAttention.q", "EncDecAttention.v"}
    with pytest.raises(ConfigError, match="language.lora_targets='nothing_here'"):
        apply_tuning(Part(t5()), section("lora", "nothing_here"), "language")
    with pytest.raises(ConfigError, match="vision.lora_targets=a,b,c"):  # a family with no known targets
        apply_tuning(Part(ResNetModel(ResNetConfig())), section("lora"), "vision")


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_full_and_frozen(mode):
    part = Part(t5())
    apply_tuning(part, section(mode), "language")
    assert all(p.requires_grad == (mode == "full") for p in part.parameters())


def test_mode_checks_come_before_anything_is_built():
    with pytest.raises(ConfigError, match="full, frozen, lora, dora"):
        check_modes(apply_overrides(Config(), ["language.train=partly"]))
    with pytest.raises(ConfigError, match="set vision.model="):
        check_modes(apply_overrides(Config(), ["vision.train=dora"]))
    with pytest.raises(ConfigError, match="rank and alpha must be at least 1"):
        check_modes(apply_overrides(Config(), ["language.model=x", "language.train=lora", "language.lora_rank=0"]))
    check_modes(apply_overrides(Config(), ["vision.model=x", "vision.train=lora", "language.train=frozen"]))


def _logits(model, inputs):
    return model(**inputs).logits


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_adapters_start_as_the_identity_and_merge_exactly(family, mode):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    inputs = {"input_ids": torch.randint(2, 50, (2, 7))}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, 50, (2, 3))
    with torch.no_grad():
        base = _logits(model, inputs)
        part = Part(model)
        apply_tuning(part, section(mode, "attention+mlp"), "language")
        assert torch.allclose(_logits(part.model, inputs), base, atol=1e-5)  # B = 0: no change yet
        for name, param in part.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        tuned = _logits(part.model, inputs)
        assert not torch.allclose(tuned, base, atol=1e-3)
        merge_adapter(part)
        assert type(part.model) is type(model) and not adapted(part.model)
        assert torch.allclose(_logits(part.model, inputs), tuned, atol=1e-4)


def test_reference_saving_keeps_adapter_and_own_modules_only(tmp_path):
    torch.manual_seed(0)
    part = Part(gpt2())
    apply_tuning(part, section("dora"), "language")
    for name, param in part.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    save_reference(part, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          OWN_WEIGHTS]
    torch.manual_seed(0)
    fresh = Part(gpt2())  # the same base weights (as loaded from the same checkpoint)
    fresh.own.reset_parameters()  # but its own module starts elsewhere
    apply_tuning(fresh, section("dora"), "language")
    load_reference(fresh, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(part.state_dict().values(), fresh.state_dict().values()))
    (tmp_path / OWN_WEIGHTS).unlink()
    with pytest.raises(ValueError, match="does not hold the weights of own"):
        load_reference(fresh, tmp_path)


def test_gradient_checkpointing_only_on_trained_parts_and_same_gradients():
    torch.manual_seed(0)
    trained, frozen = Part(gpt2()), Part(llama())
    apply_tuning(trained, section("lora"), "language")
    apply_tuning(frozen, section("frozen"), "vision")
    ids = torch.randint(2, 50, (2, 9))

    def gradients():
        trained.model.train()
        trained.model.zero_grad()
        trained.model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in trained.model.parameters() if p.requires_grad]

    plain = gradients()
    assert enable_gradient_checkpointing([trained, frozen]) == ["gpt2"]
    assert trained.model.is_gradient_checkpointing and not frozen.model.is_gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, gradients()))


def test_8bit_optimizer_needs_bitsandbytes():
    cfg = apply_overrides(Config(), ["train.optimizer=adamw8bit"])
    model = nn.Module()
    model.layer = nn.Linear(3, 3)
    model.device = torch.device("cpu")
    try:
        import bitsandbytes
    except ImportError:
        with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
            make_optimizer(model, cfg)
    else:
        assert isinstance(make_optimizer(model, cfg), bitsandbytes.optim.AdamW8bit)
    with pytest.raises(ConfigError, match="adamw, adamw8bit"):
        make_optimizer(model, apply_overrides(Config(), ["train.optimizer=sgd"]))
    assert isinstance(make_optimizer(model, Config()), torch.optim.AdamW)


def test_vision_and_language_sections_share_the_lora_fields():
    assert {k for k in vars(VisionConfig()) if k.startswith("lora_")} == \
        {k for k in vars(LanguageConfig()) if k.startswith("lora_")}


def _saved_adapter(tmp_path, rank: int = 4):
    torch.manual_seed(0)
    part = Part(gpt2())
    apply_tuning(part, section("lora", rank=rank), "language")
    save_reference(part, tmp_path)
    torch.manual_seed(0)
    fresh = Part(gpt2())
    apply_tuning(fresh, section("lora"), "language")
    return fresh


def test_a_pickled_adapter_is_refused_in_one_line_never_read(tmp_path):
    fresh = _saved_adapter(tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"payload": Payload()}, tmp_path / "adapter_model.bin")  # what peft's loader would unpickle
    with pytest.raises(CheckpointError) as err:
        load_reference(fresh, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "adapter_model.bin: refused" in message and "safetensors" in message
    assert not marker.exists()


def test_adapter_weights_that_do_not_fit_are_named(tmp_path):
    fresh = _saved_adapter(tmp_path, rank=2)  # saved with rank 2, loaded into a rank-4 adapter
    with pytest.raises(CheckpointError) as err:
        load_reference(fresh, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "adapter_model.safetensors does not fit the LoRA adapter" in message
    assert "lora_rank=4" in message and "lora_A.weight [2, 32] saved, [4, 32] expected" in message
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    save_file({**{k: torch.zeros(4, *v.shape[1:]) if "lora_A" in k else torch.zeros(v.shape[0], 4)
                  for k, v in weights.items() if k != dropped}, "stray.lora_A.weight": torch.zeros(1)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_reference(fresh, tmp_path)
    assert f"missing {dropped}" in str(err.value) and "unexpected stray.lora_A.weight" in str(err.value)
