import pytest
import torch

from vlmlab.config import ConfigError, ConnectorConfig
from vlmlab.connectors import CONNECTORS, build_connector


# instructblip needs a pretrained Q-Former's tokenizer (connector.init): test_blip2.py builds it
BUILT_ALONE = [kind for kind in CONNECTORS if kind != "instructblip"]


@pytest.mark.parametrize("kind", BUILT_ALONE)
def test_contract_b_n_dv_to_b_m_dl(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=5, hidden_size=32, num_layers=2, num_heads=4)
    connector = build_connector(cfg, vision_dim=24, lm_dim=40, num_features=17)
    features = torch.randn(3, 17, 24)
    tokens = connector(features)
    expected_m = 5 if kind in ("qformer", "perceiver", "blip2") else 17
    assert tokens.shape == (3, expected_m, 40)
    # Each example's tokens depend on its own features only.
    changed = features.clone()
    changed[1] += 1.0
    other = connector(changed)
    assert torch.allclose(other[0], tokens[0], atol=1e-5) and torch.allclose(other[2], tokens[2], atol=1e-5)
    assert not torch.allclose(other[1], tokens[1], atol=1e-3)


@pytest.mark.parametrize("kind", ["qformer", "perceiver"])
def test_views_left_out_change_nothing_and_the_read_ones_do(kind):
    # 3 views of 4 features each: [B=2, N=12, Dv]; image 0 reads its last view only, image 1 every view
    connector = build_connector(ConnectorConfig(kind=kind, num_queries=5, hidden_size=32, num_heads=4), 8, 16, 12)
    views = torch.tensor([[False, False, True], [True, True, True]])
    features = torch.randn(2, 12, 8)
    tokens = connector(features, views)
    crops_changed = features.clone()
    crops_changed[:, :8] += torch.randn(2, 8, 8)
    other = connector(crops_changed, views)
    assert torch.allclose(other[0], tokens[0], atol=1e-5)  # its crops are out of every cross-attention
    assert not torch.allclose(other[1], tokens[1], atol=1e-3)  # read: they count
    whole_changed = features.clone()
    whole_changed[0, 8:] += 1.0
    assert not torch.allclose(connector(whole_changed, views)[0], tokens[0], atol=1e-3)
    assert torch.allclose(connector(features)[1], tokens[1], atol=1e-5)  # reading every view: no mask at all
    attention = connector.layers[0].cross_attention if kind == "qformer" else connector.layers[0].attention
    keys = torch.randn(2, 12, 32)
    read = views.repeat_interleave(4, dim=1)  # [B, N]: each view's 4 features
    weights = attention.weights(torch.randn(2, 5, 32), keys, read)  # what evidence.py reads: the same mask
    assert torch.all(weights[0, :, :, :8] == 0) and torch.allclose(weights.sum(-1), torch.ones(2, 4, 5))


def test_queries_receive_gradient_from_the_features():
    connector = build_connector(ConnectorConfig(num_queries=4, hidden_size=32, num_heads=4), 16, 16, 9)
    features = torch.randn(2, 9, 16, requires_grad=True)
    connector(features).sum().backward()
    assert features.grad.abs().sum() > 0 and connector.queries.grad.abs().sum() > 0


def test_unknown_connector_lists_valid_ones():
    with pytest.raises(ConfigError, match="qformer, perceiver, mlp, linear"):
        build_connector(ConnectorConfig(kind="resampler"), 8, 8, 4)


@pytest.mark.parametrize("kind", BUILT_ALONE)
def test_positioned_features_differ_by_cell_once_positions_are_learned(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=4, hidden_size=32, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    connector = build_connector(cfg, vision_dim=8, lm_dim=8, num_features=16, positioned=True)
    features = torch.zeros(1, 16, 8)
    features[0, 0] = 1.0  # one feature, in cell 0 ...
    moved = torch.zeros(1, 16, 8)
    moved[0, 5] = 1.0  # ... or in cell 5
    if kind in ("mlp", "linear"):  # at zero positions a per-feature map only moves the token along
        assert torch.allclose(connector(features)[0, 0], connector(moved)[0, 5], atol=1e-6)
    with torch.no_grad():
        connector.positions.normal_()  # what training does to them, in one go
    # BLIP-2's initialiser (std 0.02) leaves a fresh Q-Former's output only slightly moved by the image
    assert not torch.allclose(connector(features), connector(moved), atol=1e-6 if kind == "blip2" else 1e-4)
    if kind in ("mlp", "linear"):  # a ViT's tokens carry their own positions: LLaVA's connector maps them as they are
        assert build_connector(cfg, vision_dim=8, lm_dim=8, num_features=16).positions is None


def test_merge_puts_each_block_of_cells_into_one_feature():
    from vlmlab.connectors import merge_cells
    features = torch.arange(2 * 16 * 3, dtype=torch.float32).view(1, 2 * 16, 3)  # 2 views of a 4 x 4 map, width 3
    merged = merge_cells(features, (4, 4), 2)
    assert merged.shape == (1, 2 * 4, 12)
    # the first token of view 0 holds cells (0,0), (0,1), (1,0), (1,1); the last of view 1 its cells 10, 11, 14, 15
    assert torch.equal(merged[0, 0], features[0, [0, 1, 4, 5]].flatten())
    assert torch.equal(merged[0, 7], features[0, [16 + 10, 16 + 11, 16 + 14, 16 + 15]].flatten())


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_merge_cuts_tokens_and_coords_say_where_each_token_is(kind):
    torch.manual_seed(0)
    cfg = ConnectorConfig(kind=kind, merge=2, coords=True)
    connector = build_connector(cfg, vision_dim=8, lm_dim=16, num_features=64, positioned=True, grid=(8, 8))
    features = torch.randn(3, 64, 8)
    assert connector(features).shape == (3, 16, 16)  # 8 x 8 cells -> 4 x 4 tokens
    # with positions still at zero, the same feature in every cell gives tokens that differ only by the coordinates
    same = torch.ones(1, 64, 8)
    tokens = connector(same)[0]
    assert not torch.allclose(tokens[0], tokens[15], atol=1e-4)
    plain = build_connector(ConnectorConfig(kind=kind, merge=2), 8, 16, 64, positioned=True, grid=(8, 8))
    assert torch.allclose(plain(same)[0, 0], plain(same)[0, 15], atol=1e-6)
    # x runs along a row, y down the columns, both over [-1, 1]
    assert connector.coords[0].tolist() == [-1.0, -1.0] and connector.coords[3].tolist() == [1.0, -1.0]
    assert connector.coords[12].tolist() == [-1.0, 1.0]
    assert "coords" not in connector.state_dict()  # rebuilt from the grid, not saved


def test_merge_and_coords_are_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match="no grid"):
        build_connector(ConnectorConfig(kind="mlp", coords=True), 8, 8, 16)
    with pytest.raises(ConfigError, match="does not divide"):
        build_connector(ConnectorConfig(kind="mlp", merge=3), 8, 8, 16, positioned=True, grid=(4, 4))
    with pytest.raises(ConfigError, match="apply to connector.kind"):
        build_connector(ConnectorConfig(kind="qformer", merge=2), 8, 8, 16, positioned=True, grid=(4, 4))
