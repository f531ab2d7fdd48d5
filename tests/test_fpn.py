"""The generic FPN neck in ``heads``: torchvision's FPN underneath, exact upsampling sizes, explicit extra levels."""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import heads
from heads import FPN, P6P7Block

HEADS_DIR = Path(heads.__file__).parent
CEIL_SIZES = ((63, 84), (32, 42), (16, 21), (8, 11))  # PVTv2 maps of a 250x333 image


def _maps(channels, sizes=CEIL_SIZES, batch=2) -> OrderedDict:
    return OrderedDict((str(i), torch.randn(batch, c, h, w)) for i, (c, (h, w)) in enumerate(zip(channels, sizes)))


def test_heads_package_never_imports_pvt_backbone() -> None:
    """Static check of every import statement (a subprocess import would cost seconds of torch start-up)."""
    assert len(list(HEADS_DIR.glob("*.py"))) >= 4
    for path in sorted(HEADS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
            else:
                continue
            assert not any(n.split(".")[0] == "pvt_backbone" for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("extra_levels, extra_names", [(None, ()), ("pool", ("pool",)), ("p6p7", ("p6", "p7"))])
def test_dict_in_dict_out_at_the_laterals_exact_sizes(extra_levels, extra_names) -> None:
    fpn = FPN([64, 128, 320, 512], 32, extra_levels=extra_levels)
    out = fpn(_maps(fpn.in_channels))
    assert isinstance(out, OrderedDict)
    assert tuple(out) == ("0", "1", "2", "3", *extra_names) == fpn.output_names(["0", "1", "2", "3"])
    for name, size in zip("0123", CEIL_SIZES):
        assert out[name].shape == (2, 32, *size)
    if extra_levels == "pool":
        assert out["pool"].shape[-2:] == (4, 6)
    if extra_levels == "p6p7":
        assert out["p6"].shape[-2:] == (4, 6) and out["p7"].shape[-2:] == (2, 3)


def test_is_torchvisions_fpn_with_the_same_parameters_and_outputs() -> None:
    ours = FPN([16, 32, 48], 24, extra_levels="pool")
    theirs = FeaturePyramidNetwork([16, 32, 48], 24, extra_blocks=LastLevelMaxPool())
    theirs.load_state_dict(ours.state_dict())  # strict: identical key layout
    maps = _maps([16, 32, 48], CEIL_SIZES[:3])
    expected = theirs(maps)
    got = ours(maps)
    assert list(got) == list(expected)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_pool_level_is_a_stride_two_subsample_of_the_last_output() -> None:
    out = FPN([8, 8], 8, extra_levels="pool")(_maps([8, 8], ((10, 14), (5, 7))))
    torch.testing.assert_close(out["pool"], out["1"][:, :, ::2, ::2], rtol=0, atol=0)


@pytest.mark.parametrize("source", ["p5", "c5"])
def test_p6_reads_the_named_source_even_when_c5_is_as_wide_as_the_fpn(source) -> None:
    fpn = FPN([64, 128, 256], 256, extra_levels="p6p7", p6p7_source=source)  # C5 width == FPN width
    seen = []
    fpn.extra_blocks.p6.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    maps = _maps([64, 128, 256], CEIL_SIZES[1:])
    out = fpn(maps)
    expected = out["2"] if source == "p5" else maps["2"]
    assert len(seen) == 1 and seen[0] is expected
    assert not torch.equal(out["2"], maps["2"])  # the two candidates really differ
    torch.testing.assert_close(out["p7"], fpn.extra_blocks.p7(F.relu(out["p6"])))


def test_p6p7_block_channels_follow_the_source_not_the_widths() -> None:
    assert P6P7Block(256, source="c5", c5_channels=512).p6.in_channels == 512
    assert P6P7Block(256, source="p5", c5_channels=512).p6.in_channels == 256
    assert FPN([64, 128, 512], 256, extra_levels="p6p7", p6p7_source="c5").extra_blocks.p6.in_channels == 512
    assert FPN([64, 128, 512], 256, extra_levels="p6p7").extra_blocks.source == "p5"  # the documented default


def test_norm_layer_reaches_every_fpn_conv() -> None:
    fpn = FPN([8, 16], 8, norm_layer=nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fpn.modules()) == 4
    assert all(m.bias is None for m in fpn.modules() if isinstance(m, nn.Conv2d))


def test_bad_arguments_and_inputs_get_readable_errors() -> None:
    with pytest.raises(ValueError, match="extra_levels must be one of"):
        FPN([8], 8, extra_levels="p6")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source must be one of"):
        FPN([8], 8, extra_levels="p6p7", p6p7_source="c4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs c5_channels"):
        P6P7Block(8, source="c5")
    with pytest.raises(ValueError, match="in_channels entries must be a positive int"):
        FPN([8, 0], 8)
    with pytest.raises(TypeError, match="non-empty sequence"):
        FPN(8, 8)  # type: ignore[arg-type]
    fpn = FPN([8, 16], 8)
    with pytest.raises(ValueError, match=r"built for 2 maps with channels \[8, 16\], got 1"):
        fpn({"0": torch.randn(1, 8, 4, 4)})
    with pytest.raises(ValueError, match=r"input '1' must be \(B, 16, H, W\)"):
        fpn({"0": torch.randn(1, 8, 4, 4), "1": torch.randn(1, 12, 2, 2)})
    with pytest.raises(TypeError, match="expects a dict"):
        fpn([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)])  # type: ignore[arg-type]
