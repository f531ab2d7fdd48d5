"""torchvision's feature tools on the backbone: FX feature extraction, graph node names, torchvision's FPN."""

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.ops import FeaturePyramidNetwork

from pvt_backbone import PVTv2, PVTv2Backbone, PVTv2Config


def _as_maps(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage outputs are (B, H, W, C) tokens; the backbone returns them as (B, C, H, W)."""
    return {name: t.permute(0, 3, 1, 2) for name, t in tokens.items()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_extracted_stages_equal_the_backbone_maps(tiny_config: PVTv2Config, mode: str) -> None:
    model = PVTv2Backbone(tiny_config).train(mode == "train")
    extractor = create_feature_extractor(model, {f"stages.{i}": f"c{i + 2}" for i in range(4)})
    x = torch.rand(2, 3, 67, 93)
    with torch.no_grad():
        expected = model(x)
        got = _as_maps(extractor(x))
    assert list(got) == ["c2", "c3", "c4", "c5"]
    for i, name in enumerate(got):
        assert got[name].shape == expected[str(i)].shape
        # eval + no_grad runs the backbone's inference path; the traced graph holds Block.forward: same to rounding
        torch.testing.assert_close(got[name], expected[str(i)], rtol=1e-5, atol=1e-5)


def test_graph_traced_without_autograd_runs_other_sizes(tiny_config: PVTv2Config) -> None:
    """Tracing under no_grad in eval mode records no data-dependent branch of the inference path."""
    model = PVTv2Backbone(tiny_config, out_indices=(2,)).eval()
    with torch.no_grad():
        extractor = create_feature_extractor(model, {"stages.2": "c4"})
        for shape in [(1, 3, 64, 64), (3, 3, 97, 61)]:
            x = torch.rand(shape)
            torch.testing.assert_close(extractor(x)["c4"].permute(0, 3, 1, 2), model(x)["2"], rtol=1e-5, atol=1e-5)


def test_graph_node_names_list_every_stage(tiny_config: PVTv2Config) -> None:
    train_nodes, eval_nodes = get_graph_node_names(PVTv2Backbone(tiny_config))
    for nodes in (train_nodes, eval_nodes):
        assert nodes[0] == "x"
        assert {"patch_embed.proj", "stages.0.blocks.0.attn.q", "stages.3.norm"} <= set(nodes)
        assert {f"stages.{i}" for i in range(4)} <= {name.rsplit(".", 1)[0] for name in nodes}


def test_classifier_features_extract_too(tiny_config: PVTv2Config) -> None:
    model = PVTv2(tiny_config, num_classes=5).eval()
    extractor = create_feature_extractor(model, {"stages.3": "c5", "head": "logits"})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x), rtol=1e-5, atol=1e-5)
    assert out["c5"].shape == (2, 2, 2, tiny_config.embed_dims[3])


def test_torchvision_fpn_on_the_backbone_channels(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config, out_indices=(1, 2, 3))
    fpn = FeaturePyramidNetwork(list(model.channels), out_channels=16)
    features = model(torch.rand(1, 3, 67, 93))
    pyramid = fpn(features)
    assert list(pyramid) == ["1", "2", "3"]
    assert [tuple(p.shape) for p in pyramid.values()] == [(1, 16, *f.shape[-2:]) for f in features.values()]
