"""Predict with a trained checkpoint on an image, a folder or a glob; write pictures (boxes, masks, labels drawn with
torchvision.utils) and optionally a JSON of the detections.

    pvt-predict --checkpoint runs/demo --input photo.jpg --output-dir preds
    pvt-predict --checkpoint runs/demo --input "data/val/*.jpg" --output-dir preds --json
    pvt-predict --checkpoint runs/seg --input data/val_images --output-dir preds   # also <name>_mask.png
    pvt-predict --checkpoint runs/demo --input small.png --output-dir preds --scale 4   # picture drawn 4x larger
    pvt-predict --checkpoint mask_rcnn_pvt_v2_b2.safetensors --input photo.jpg --output-dir preds --json
    pvt-predict --checkpoint runs/demo --runtime onnxruntime --exported exports/demo.onnx --exported-size 96x96 \
        --input photo.jpg --output-dir preds

--runtime onnxruntime|openvino|torch runs the checkpoint's whole-model export (pvt-export --checkpoint RUN --to
onnx|openvino|pt2) instead of the eager model: each image is fitted into --exported-size keeping its aspect ratio
(padded at the bottom and right as the eager detector pads) and the detections are mapped back to its pixels; names
come from the checkpoint as before. --exported and --exported-size need a --runtime other than eager.

--checkpoint also takes a published detector file without a run.json: an mmdet RetinaNet / Faster R-CNN / Mask
R-CNN checkpoint (--trust-pickle if its pickle needs code) or what pvt-convert --to detector wrote. It predicts at
mmdet's test scale (shorter side 800, longer at most 1333) and names classes as the file does.

Each input x.jpg gives <output-dir>/x.png (segmenters also x_mask.png); --json writes <output-dir>/predictions.json,
which names every input's output files (detections in input pixels; with masks also "mask_area" and "segmentation",
COCO compressed RLE). x_mask.png is a palette PNG: its pixel values are the class ids, its palette the drawing's
class colours. --scale draws the picture on an input enlarged that many times (labels fit small images); masks and
JSON stay at the input's size. Inputs whose outputs would share a name (a.jpg and a.png, or a.png and
a_mask.png) are named with their suffix instead: a_jpg.png, a_png.png. No output is ever written over an input, nor
two outputs to one path: an --output-dir that holds any input image is refused (its drawings could replace inputs,
and a later run over that folder would read them as inputs), and so are inputs that would still share an output
name (one file name from two folders). An image that cannot be read is skipped with one line on stderr (and listed
under "skipped" in predictions.json); every other image is still predicted, and the command then exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor, nn

from ..training.data import DataError, load_image
from ..training.distributed import DEVICES, setup_distributed
from ..training.inference import (
    MAX_DRAW_SCALE,
    SegmentationMap,
    check_draw_scale,
    class_colour,
    draw,
    find_images,
    load_trained,
    predict,
)
from ..training.tasks import ModelSpec
from ..weights.io import atomic_write
from .common import add_runtime_arguments, add_threads_argument, apply_threads, check_runtime_arguments, exported_model
from .convert import LOADING_FLAGS, worded_in_flags
from .runner import UsageError, command_parser, entry_point

__all__ = ["Outputs", "build_parser", "plan_outputs", "mask_palette", "main", "run"]

Outputs = tuple[Path, Path | None]
"""Where one input's picture and (segmenters) class-id mask go."""


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-predict`` command line."""
    parser = command_parser(__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint directory, model.safetensors or detector file"
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow a detector .pth pickle that needs code")
    parser.add_argument("--input", required=True, help="image file, folder of images, or glob pattern (quote it)")
    parser.add_argument(
        "--output-dir", required=True, help="pictures (and predictions.json) go here; must not hold any input image"
    )
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--json", action="store_true", help="also write predictions.json")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help=f"draw pictures on the image enlarged FACTOR times, in (0, {MAX_DRAW_SCALE:g}] (default 1); "
        "masks and JSON stay in input pixels",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    add_runtime_arguments(parser)
    add_threads_argument(parser)
    return parser


def _names(base: str, masks: bool) -> list[str]:
    return [f"{base}.png", f"{base}_mask.png"] if masks else [f"{base}.png"]


def _clashing(bases: Sequence[str], masks: bool) -> dict[str, list[int]]:
    """Output name (case-folded: some file systems ignore case) -> the inputs writing it, where more than one does."""
    owners: dict[str, list[int]] = defaultdict(list)
    for index, base in enumerate(bases):
        for name in _names(base, masks):
            owners[name.casefold()].append(index)
    return {name: sorted(set(indices)) for name, indices in owners.items() if len(set(indices)) > 1}


def _check_output_dir(images: Sequence[Path], output_dir: Path) -> None:
    """:class:`UsageError` if ``output_dir`` holds an input: as a folder entry, or as where a link to one leads."""
    target = output_dir.resolve()
    inside = [str(p) for p in images if target in (p.parent.resolve(), p.resolve().parent)]
    if inside:
        shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        raise UsageError(
            f"--output-dir {output_dir} holds input images ({shown}); choose a folder that holds none, so that no "
            "drawing can replace an input or be read as one"
        )


def plan_outputs(images: Sequence[Path], output_dir: Path, *, masks: bool) -> list[Outputs]:
    """Each input's output paths: ``<stem>.png`` (and ``<stem>_mask.png``), or ``<stem>_<suffix>.png`` for inputs
    whose plain names would clash; :class:`UsageError` if ``output_dir`` holds an input, if names still clash (one
    file name from two folders), or if an output path resolves to an input.

    Example:
        >>> plan = plan_outputs([Path("in/a.jpg"), Path("in/a.png"), Path("in/b.png")], Path("out"), masks=False)
        >>> [str(picture) for picture, _ in plan]
        ['out/a_jpg.png', 'out/a_png.png', 'out/b.png']
    """
    _check_output_dir(images, output_dir)
    clashes = {index for indices in _clashing([p.stem for p in images], masks).values() for index in indices}
    bases = [f"{p.stem}_{p.suffix[1:]}" if i in clashes else p.stem for i, p in enumerate(images)]
    still = _clashing(bases, masks)
    if still:
        name, indices = next(iter(still.items()))
        shown = " and ".join(str(images[i]) for i in indices)
        raise UsageError(f"inputs {shown} would both write {name} in --output-dir; predict them into separate folders")
    plan = [(output_dir / f"{b}.png", output_dir / f"{b}_mask.png" if masks else None) for b in bases]
    inputs = {path.resolve() for path in images}
    if any(path.resolve() in inputs for outputs in plan for path in outputs if path is not None):
        raise UsageError(f"--output-dir {output_dir} leads back to input images; choose another folder")
    return plan


def _save_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) or (H, W) uint8 -> a PNG at ``path``, written atomically."""
    atomic_write(path, lambda temp: Image.fromarray(array).save(temp, format="PNG"))


def mask_palette() -> list[int]:
    """The 256-entry RGB palette (768 ints) of a ``_mask.png``: entry ``i`` is :func:`class_colour` ``(i)``."""
    return [channel for class_id in range(256) for channel in class_colour(class_id)]


def _save_mask(classes: Tensor, path: Path) -> None:
    """An (H, W) class-id map -> a palette ("P") PNG whose pixel values are the ids, written atomically."""
    if classes.numel() and int(classes.max()) > 255:
        raise ValueError(f"{path}: class ids up to {int(classes.max())} do not fit an 8-bit PNG mask (at most 255)")
    picture = Image.fromarray(classes.numpy().astype(np.uint8))
    picture.putpalette(mask_palette())  # an "L" image becomes "P" with its values kept as palette indices
    atomic_write(path, lambda temp: picture.save(temp, format="PNG"))


def _predict_one(
    model: nn.Module, spec: ModelSpec, image: Tensor, path: Path, outputs: Outputs, args: argparse.Namespace
) -> dict[str, Any]:
    """Predict on one (3, H, W) image read from ``path``, write its picture (and mask); returns its JSON record."""
    picture, mask = outputs
    prediction = predict(model, spec, image, score_threshold=args.score_threshold)
    _save_png(draw(image, prediction, scale=args.scale).permute(1, 2, 0).numpy(), picture)
    record: dict[str, Any] = {"file": str(path), "picture": str(picture)}
    record.update(width=image.shape[-1], height=image.shape[-2])
    if isinstance(prediction, SegmentationMap):
        if mask is not None:  # planned for every segmenter input
            _save_mask(prediction.classes, mask)
            record["mask"] = str(mask)
        record["class_pixels"] = prediction.to_json()
    else:
        record["detections"] = prediction.to_json(spec.category_ids)
    what = f"{len(record['detections'])} detections" if "detections" in record else "segmentation"
    print(f"{path} -> {picture} ({what})")
    return record


def _read(path: Path, prog: str, skipped: list[dict[str, str]]) -> Tensor | None:
    """The (3, H, W) image at ``path``, or None after reporting why it cannot be read (one line on stderr)."""
    try:
        return load_image(path)
    except (DataError, Image.DecompressionBombError) as error:
        problem = getattr(error, "problem", None) or str(error)
        print(f"{prog}: skipped {path}: {problem}", file=sys.stderr)
        skipped.append({"file": str(path), "error": problem})
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``pvt-predict``: one picture per input image, and ``predictions.json`` with ``--json``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must lie in [0, 1], got {args.score_threshold}")
    try:
        check_draw_scale(args.scale)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    check_runtime_arguments(args)
    images = find_images(args.input)
    with worded_in_flags(LOADING_FLAGS):
        model, spec = load_trained(
            args.checkpoint, device=setup_distributed(args.device).device, trust_pickle=args.trust_pickle
        )
    model = exported_model(args, model, spec)
    output_dir = Path(args.output_dir)
    plan = plan_outputs(images, output_dir, masks=spec.task == "segmentation")
    output_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for path, outputs in zip(images, plan):
        image = _read(path, parser.prog, skipped)
        if image is not None:
            records.append(_predict_one(model, spec, image, path, outputs, args))
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "task": spec.task, "images": records, "skipped": skipped}
        text = json.dumps(report, indent=2)
        atomic_write(output_dir / "predictions.json", lambda temp: temp.write_text(text + "\n"))
    if skipped:
        raise ValueError(f"{len(skipped)} of {len(images)} input images could not be read and were skipped")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
