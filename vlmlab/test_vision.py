import copy

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from vlmlab.config import ConfigError, VisionConfig
from vlmlab.vision import TINY_FAMILIES, VisionTower, build_vision, layers_computed

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2)


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_tiny_towers_give_b_n_dv_and_reload_by_path(family, tmp_path):
    tower = build_vision(VisionConfig(family=family, **TINY)).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = tower(pixels)
    assert features.ndim == 3 and features.shape[0] == 2
    assert tower.feature_layout()[:2] == tuple(features.shape[1:])
    tower.save(tmp_path / "tower")
    loaded = build_vision(VisionConfig(model=str(tmp_path / "tower"), **TINY)).eval()
    assert torch.equal(loaded.mean, tower.mean) and loaded.image_size == 32
    assert torch.allclose(loaded(pixels), features, atol=1e-6)


def test_convolutional_maps_are_read_row_by_row():
    tower = build_vision(VisionConfig(family="resnet", image_size=64, hidden_size=32, num_layers=2)).eval()
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    grid = tower.model(pixel_values=(pixels.float() / 255 - 0.5) / 0.5).last_hidden_state  # [1, C, 8, 8]
    features = tower(pixels)
    assert features.shape == (1, 64, 32)
    assert torch.allclose(features[0, 9], grid[0, :, 1, 1])  # row 1, column 1
    assert tower.feature_layout() == (64, 32, (8, 8))
    assert build_vision(VisionConfig(**TINY)).feature_layout()[2] is None  # a ViT's tokens carry their positions


def test_layers_computed_counts_the_blocks_up_to_the_feature_layer():
    assert [layers_computed(24, layer) for layer in (-1, -2, -24, 24, 23, 5)] == [24, 23, 1, 24, 23, 5]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_feature_layer_runs_only_the_blocks_it_needs_and_saves_them_all(family, tmp_path):
    whole = TINY_FAMILIES[family](VisionConfig(family=family, **dict(TINY, num_layers=3))).eval()
    tower = VisionTower(copy.deepcopy(whole), -2, 32, [0.5] * 3, [0.5] * 3).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    states = whole(pixel_values=(pixels.float() / 255 - 0.5) / 0.5, output_hidden_states=True).hidden_states
    assert torch.equal(tower(pixels), states[-2])  # the raw output of block 2 of 3, before any final norm
    blocks = next(module for name, module in whole.named_modules() if name.endswith("encoder.layers"))
    last_block = sum(p.numel() for p in blocks[-1].parameters())
    count = sum(p.numel() for p in tower.parameters())
    assert count == sum(p.numel() for p in whole.parameters()) - last_block  # block 3 is off the module tree

    tower.save(tmp_path / "tower")  # the whole checkpoint, block 3 included ...
    saved, expected = type(whole).from_pretrained(tmp_path / "tower").state_dict(), whole.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert sum(p.numel() for p in tower.parameters()) == count  # ... and the tower runs two blocks again
    loaded = build_vision(VisionConfig(model=str(tmp_path / "tower"), feature_layer=-2)).eval()
    assert torch.equal(loaded(pixels), states[-2]) and sum(p.numel() for p in loaded.parameters()) == count


def test_a_dual_encoder_checkpoint_loads_only_its_vision_half(tmp_path):
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tower = build_vision(VisionConfig(model=str(tmp_path / "clip")))
    assert type(tower.model).__name__ == "CLIPVisionModel" and tower.image_size == 32
    assert tower.feature_layout() == (17, 16, None)  # 16 patches + CLS
    assert tower.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # no preprocessor saved


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="clip, siglip, resnet"):
        build_vision(VisionConfig(family="vit"))
