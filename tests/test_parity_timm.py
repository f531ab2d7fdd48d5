"""Numerical parity with timm's pvt_v2 for every variant: the same random weights loaded into both by identity."""

import pytest
import torch

from pvt_backbone import VARIANTS, PVTv2Backbone
from pvt_backbone.classifier import build_classifier

timm = pytest.importorskip("timm")


def _random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random weights with sane activation scales, and random LayerNorm affines so the eps split matters."""
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    state = {}
    for key, meta in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in norms:
            state[key] = torch.randn(meta.shape) * 0.2 + (1.0 if key.endswith("weight") else 0.0)
        elif meta.dim() > 1:
            state[key] = torch.randn(meta.shape) / meta[0].numel() ** 0.5
        else:
            state[key] = torch.randn(meta.shape) * 0.02
    return state


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parity_with_timm(name: str) -> None:
    with torch.device("meta"):
        reference = timm.create_model(f"pvt_v2_{name}", pretrained=False)
        classifier = build_classifier(name)
        backbone = PVTv2Backbone.from_config(name)
    state = _random_state(classifier)
    reference.load_state_dict(state, assign=True)
    classifier.load_state_dict(state, assign=True)
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, assign=True)
    reference.eval(), classifier.eval(), backbone.eval()

    for size in [(224, 224), (250, 333)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            final, intermediates = reference.forward_intermediates(x)
            expected_logits = reference.forward_head(final)
            features = backbone(x)
            logits = classifier(x)
        assert len(intermediates) == len(features) == 4
        for i, expected in enumerate(intermediates):
            torch.testing.assert_close(features[str(i)], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
