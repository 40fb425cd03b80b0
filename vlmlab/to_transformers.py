"""`vlmlab export --format transformers`: a vlmlab model as a plain transformers LLaVA checkpoint.

The one architecture that maps exactly: a CLIP or SigLIP tower -> the `mlp` connector (Linear-GELU-Linear per
feature, no learned positions: a ViT's are not added) -> a Llama-style causal LM reading the visual tokens as a
prefix. That is `LlavaForConditionalGeneration`: `vision_tower` (the tower, whole), `multi_modal_projector.linear_1/
linear_2` (the MLP), `language_model` + `lm_head` (the Llama). vlmlab keeps every token of the tower (CLS too), so
`vision_feature_select_strategy="full"`; its `feature_layer` is LLaVA's `vision_feature_layer`. The prompt gets an
`<image>` token added to the tokenizer (its embedding row is never read: LLaVA puts the image features there; its
output row is the mean of the others', so it scores below the best token and greedy decoding never picks it).

Everything else (a convnet's learned positions, a Q-Former or perceiver, T5 or GPT-2, cross-attention fusion,
image splitting, a SigLIP tower read after its post-layernorm) has no transformers class: `export_llava` raises
ValueError("... needs vlmlab to load: <why>").
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
_TOWERS = {"clip": 1, "siglip": 0}  # family -> tokens beside the patches (CLIP's CLS)


def _refuse(why: str):
    raise ValueError(f"this model has no transformers class and needs vlmlab to load: {why}")


def _check(model) -> str:
    """The tower's model_type when `model` maps onto LLaVA exactly; else the one-line ValueError."""
    from vlmlab.images import num_views
    from vlmlab.tuning import is_adapted

    cfg = model.config
    tower_type = model.vision.model.config.model_type
    family = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(tower_type)
    if family is None:
        _refuse(f"vision tower {tower_type!r} (LLaVA export covers CLIP and SigLIP ViTs)")
    if cfg.connector.kind != "mlp":
        _refuse(f"connector.kind={cfg.connector.kind!r} (LLaVA's projector is the mlp connector)")
    connector = model.connector
    mlp = getattr(connector, "projection", None)
    if (getattr(connector, "positions", None) is not None or not isinstance(mlp, nn.Sequential) or len(mlp) != 3
            or not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[2], nn.Linear)
            or not isinstance(mlp[1], nn.GELU) or mlp[1].approximate != "none"):
        _refuse("the mlp connector adds learned feature positions or is not Linear-GELU-Linear")
    lm = model.language.model
    if lm.config.model_type != "llama" or model.language.is_encoder_decoder:
        _refuse(f"language model {lm.config.model_type!r} (LLaVA export covers Llama-style causal LMs)")
    if model.language.fusion is not None:
        _refuse("language.fusion=cross_attention (LLaVA reads the visual tokens as a prefix)")
    if num_views(cfg.data) != 1:
        _refuse("data.image_split (LLaVA encodes one view per image)")
    if is_adapted(model.vision.model) or is_adapted(lm):
        _refuse("a LoRA/DoRA adapter is left (export with --merge)")
    layers = model.vision.model.config.num_hidden_layers
    if family == "siglip" and model.vision.feature_layer in (-1, layers):
        _refuse("a SigLIP tower read at its last layer gives last_hidden_state after post_layernorm, which "
                "LLaVA's hidden_states never are (use vision.feature_layer=-2)")
    return family


def export_llava(model, folder: str | Path) -> Path:
    """Writes `model` (a `VLM`) to `folder` as a `LlavaForConditionalGeneration` checkpoint with its tokenizer
    (the `<image>` token added) and a `LlavaProcessor`; `AutoProcessor` / `from_pretrained` load it."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    family = _check(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision, lm, mlp = model.vision, model.language.model, model.connector.projection
    tokenizer = copy.deepcopy(model.language.tokenizer)  # the model's own stays as it is
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with vision.whole():
        vision_config = vision.model.config.to_dict()
        vision_state = {k: v.detach().clone() for k, v in vision.model.state_dict().items()}
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config.to_dict(),
        image_token_index=image_id,
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy="full",  # vlmlab keeps every token, CLS included
        projector_hidden_act="gelu",
        multimodal_projector_bias=mlp[0].bias is not None,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    llava.model.vision_tower.load_state_dict(vision_state)
    llava.model.multi_modal_projector.linear_1.load_state_dict(mlp[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(mlp[2].state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    old = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            llava.get_input_embeddings().weight[old:] = 0.0
            head = llava.get_output_embeddings().weight
            head[old:] = head[:old].mean(0)  # scores the mean of the other tokens' logits: never the argmax
    llava.generation_config.eos_token_id = model.language.eos_id
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.generation_config.bos_token_id = lm.generation_config.bos_token_id
    llava.save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": vision.image_size, "width": vision.image_size}, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
        image_mean=vision.mean.flatten().tolist(), image_std=vision.std.flatten().tolist(),
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.model.config.patch_size,
        vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=_TOWERS[family],
    )
    processor.save_pretrained(folder)
    return folder
