import pytest
import torch

from vlmlab.config import ConfigError, ConnectorConfig
from vlmlab.connectors import CONNECTORS, build_connector


@pytest.mark.parametrize("kind", list(CONNECTORS))
def test_contract_b_n_dv_to_b_m_dl(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=5, hidden_size=32, num_layers=2, num_heads=4)
    connector = build_connector(cfg, vision_dim=24, lm_dim=40, num_features=17)
    features = torch.randn(3, 17, 24)
    tokens = connector(features)
    expected_m = 5 if kind in ("qformer", "perceiver") else 17
    assert tokens.shape == (3, expected_m, 40)
    # Each example's tokens depend on its own features only.
    changed = features.clone()
    changed[1] += 1.0
    other = connector(changed)
    assert torch.allclose(other[0], tokens[0], atol=1e-5) and torch.allclose(other[2], tokens[2], atol=1e-5)
    assert not torch.allclose(other[1], tokens[1], atol=1e-3)


def test_queries_receive_gradient_from_the_features():
    connector = build_connector(ConnectorConfig(num_queries=4, hidden_size=32, num_heads=4), 16, 16, 9)
    features = torch.randn(2, 9, 16, requires_grad=True)
    connector(features).sum().backward()
    assert features.grad.abs().sum() > 0 and connector.queries.grad.abs().sum() > 0


def test_unknown_connector_lists_valid_ones():
    with pytest.raises(ConfigError, match="qformer, perceiver, mlp, linear"):
        build_connector(ConnectorConfig(kind="resampler"), 8, 8, 4)
