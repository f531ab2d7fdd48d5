"""Draw the README picture of a published-detector prediction: tools/assets/published_detector_prediction.png.

    .venv/bin/python tools/dev/published_detector_picture.py [--output PATH]

The steps a user takes with a published mmdet PVTv2 Mask R-CNN, on the tiny mmdet 3.3 fixture
(tests/fixtures/mmdet/maskrcnn.pth: mmdet's Mask R-CNN around a PVTv2 with embed dims 8/16/32/32, RANDOM weights,
classes thing0 ... thing4): ``pvt-convert --to detector`` (its custom backbone's num_heads via ``--arch-config``),
then ``pvt-predict`` on a synthetic scene (pvt_backbone.training.data.synthetic). The boxes and masks are what those
random weights compute, through mmdet's own test pipeline; they show the plumbing, not detection quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from pvt_backbone.cli import convert, predict
from pvt_backbone.cli.runner import run_command
from pvt_backbone.training.data.synthetic import SyntheticConfig, render_scene

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "mmdet" / "maskrcnn.pth"
# mmdet's PyramidVisionTransformerV2(embed_dims=8, num_heads=[1, 2, 4, 4], num_layers=[1, 1, 1, 1]) of the fixture.
ARCH_CONFIG = {"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 4]}
SCENE_SIZE = 192
SCORE_THRESHOLD = "0.36"  # random weights score ~0.3 everywhere; this keeps the 8 highest of this scene
COLOURS = 64  # palette size of the saved PNG: keeps it well under 100 KB


def make_picture(output: Path) -> Path:
    """Convert the fixture, predict on one synthetic scene, save the drawn prediction as a small palette PNG."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        detector = work / "maskrcnn.safetensors"
        argv = [str(FIXTURE), str(detector), "--to", "detector", "--arch-config", json.dumps(ARCH_CONFIG)]
        if run_command(convert.main, argv) != 0:
            raise SystemExit("pvt-convert failed")
        scene = render_scene(SyntheticConfig(image_size=SCENE_SIZE), "val", 0)
        (work / "in").mkdir()
        Image.fromarray(scene.image).save(work / "in" / "scene.png")
        argv = ["--checkpoint", str(detector), "--input", str(work / "in" / "scene.png"), "--output-dir"]
        argv += [str(work / "out"), "--score-threshold", SCORE_THRESHOLD, "--scale", "2"]
        if run_command(predict.main, argv) != 0:
            raise SystemExit("pvt-predict failed")
        picture = Image.open(work / "out" / "scene.png").convert("RGB")
        picture.quantize(COLOURS).save(work / "small.png", optimize=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "small.png", output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "tools" / "assets" / "published_detector_prediction.png")
    path = make_picture(parser.parse_args().output)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
