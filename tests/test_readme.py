"""Every ```python block of README.md runs as written, alone, in a temp directory holding the files it names.

The files are made on the fly from random weights in the layouts the README names: the authors' classifier release
(``pvt_v2_b2.pth``), a timm classifier file (``model.safetensors``), mmdet detector checkpoints
(``mask_rcnn_pvt_v2_b2.pth`` and whole published-layout RetinaNet / Mask R-CNN files), two published entries in a
local torch hub cache (nothing downloads) and a trained Mask R-CNN's ``model.safetensors`` under ``runs/coco``. A few
sizes are shrunk (``SHRINK``: each substitution must still match the README, so it cannot go stale silently).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pvt_backbone import pvt_v2_b2
from pvt_backbone.detection import maskrcnn_pvt_v2_fpn, pvt_fpn_backbone
from pvt_backbone.mmdet_compat import mmdet_rcnn, mmdet_retinanet
from pvt_backbone.weights import from_native, get_weights
from pvt_backbone.weights.detectors import to_mmdet_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# (text of a block, replacement, why): the block's point survives, the CPU time does not matter to it.
SHRINK = [
    ("min_size=800, max_size=1333", "min_size=128, max_size=192", "a b2 train step at 800x1333 takes minutes on CPU"),
    ("(2, 3, 512, 512)", "(2, 3, 128, 160)", "a b2 Semantic FPN at 512x512 takes 10 s on 2 CPU cores"),
    ("(0, 150, (2, 512, 512))", "(0, 150, (2, 128, 160))", "labels of the shrunk images' size"),
    ("PVTv2Backbone.b2().eval()", "PVTv2Backbone.b0().eval()", "exporting b2 to ONNX and .pt2 takes minutes on CPU"),
]


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _shrunk(code: str) -> str:
    for old, new, _ in SHRINK:
        code = code.replace(old, new)
    return code


def _printed_expectations(code: str) -> list[str]:
    """``# ...`` lines right after a ``print(...)`` line: the output the README shows for that call."""
    lines = code.splitlines()
    shown = []
    for before, line in zip(lines, lines[1:]):
        if before.startswith("print(") and line.startswith("# "):
            shown.append(line[2:])
    return shown


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def _save_mmdet_detectors(root: Path) -> None:
    """B2 RetinaNet and Mask R-CNN checkpoints for COCO in mmdet's layout, as mmdet writes them (random weights)."""
    for arch, name in (
        ("retinanet", "retinanet_pvtv2-b2_fpn_1x_coco.pth"),
        ("maskrcnn", "mask_rcnn_pvt_v2_b2_fpn_1x_coco.pth"),
    ):
        if arch == "retinanet":
            body = pvt_fpn_backbone("b2", out_indices=(1, 2, 3), extra_levels="p6p7", p6p7_source="c5")
            model = mmdet_retinanet(body, 80)
        else:
            model = mmdet_rcnn(pvt_fpn_backbone("b2"), 80)
        state = to_mmdet_state_dict(model.state_dict(), arch)
        torch.save({"meta": {"epoch": 12}, "state_dict": state}, root / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The files the README loads, from random weights."""
    root = tmp_path_factory.mktemp("readme")
    hub = pytest.MonkeyPatch()
    hub.setenv("TORCH_HOME", str(root / "torch_home"))
    native = pvt_v2_b2().state_dict()
    torch.save(from_native(native, "pvt").state_dict, root / "pvt_v2_b2.pth")  # authors' release layout
    _save(native, root / "model.safetensors")  # timm classifier file
    body = {k: v for k, v in native.items() if not k.startswith("head.")}
    mmdet = {f"backbone.{k}": v for k, v in from_native(body, "mmdet").state_dict.items()}
    mmdet["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    torch.save({"meta": {"epoch": 12}, "state_dict": mmdet}, root / "mask_rcnn_pvt_v2_b2.pth")
    # published entries already in the torch hub cache (``TORCH_HOME`` below), as after a first download
    for name in ("pvt_v2_b2.in1k", "pvt_v2_b2.in1k_timm"):
        cached = get_weights(name).cache_path
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / ("pvt_v2_b2.pth" if name.endswith("in1k") else "model.safetensors"), cached)
    _save_mmdet_detectors(root)
    detector = maskrcnn_pvt_v2_fpn("b2", num_classes=81).state_dict()
    _save(detector, root / "runs/coco/checkpoints/step_00000100/model.safetensors")
    yield root
    hub.undo()


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(workdir)
    yield workdir


def test_readme_has_the_blocks_and_every_shrink_applies() -> None:
    blocks = _blocks()
    assert len(blocks) >= 7
    for old, _, why in SHRINK:
        assert sum(old in block for block in blocks) == 1, f"{old!r} ({why}) is not in exactly one README block"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs_alone(index: int, in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _blocks()[index]
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(compile(_shrunk(code), f"README.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    for line in _printed_expectations(code):
        assert line in printed, f"README shows {line!r} but the block printed {printed}"
