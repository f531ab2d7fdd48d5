"""What a user of the training workflow sees: the loss plot, class names from a file, palette masks, enlarged
prediction pictures, RLE masks in the JSON, and AP per class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tiny_runs import TINY_OPTIONS

from pvt_backbone.cli import evaluate as evaluate_cli
from pvt_backbone.cli import predict as predict_cli
from pvt_backbone.cli import train as train_cli
from pvt_backbone.cli.runner import EXIT_USAGE, run_command
from pvt_backbone.training.data import (
    CocoDetection,
    DataError,
    SyntheticConfig,
    SyntheticSegmentation,
    SyntheticShapes,
    load_image,
)
from pvt_backbone.training.data.folder import SegmentationFolder, read_class_names
from pvt_backbone.training.data.synthetic import write_coco, write_mask_folder
from pvt_backbone.training.evaluation import coco_evaluate
from pvt_backbone.training.inference import (
    PALETTE,
    Detections,
    SegmentationMap,
    class_colour,
    draw,
    load_trained,
    predict,
    scale_prediction,
)
from pvt_backbone.training.logs import loss_figure, plot_loss_curve, smoothed
from pvt_backbone.training.tasks import DataSpec, ModelSpec, build_datasets, build_model, evaluate

COMMANDS = {"train": train_cli, "evaluate": evaluate_cli, "predict": predict_cli}
NAMES = ("background", "disc", "block")


def _run(name: str, argv: list) -> int:
    try:
        return run_command(COMMANDS[name].main, [str(a) for a in argv])
    except SystemExit as exit_info:  # argparse
        return int(exit_info.code or 0)


# -- the loss plot ---------------------------------------------------------------------------------------------------
def test_smoothed_loss_starts_at_the_data_and_keeps_a_constant() -> None:
    losses = [4.0, 3.0, 3.5, 2.0, 2.5]
    curve = smoothed(losses)
    assert curve[0] == losses[0] and len(curve) == len(losses)
    assert smoothed([0.7] * 50) == [0.7] * 50  # no lag towards 0 on a short or flat run
    assert min(losses) <= min(curve) and max(curve) <= max(losses)  # an average never leaves the data's range
    # The bias-corrected average: the decay-weighted mean of the values so far.
    weights = [0.9**age for age in range(len(losses))][::-1]
    assert curve[-1] == pytest.approx(sum(w * v for w, v in zip(weights, losses)) / sum(weights))
    with pytest.raises(ValueError, match="decay"):
        smoothed(losses, decay=1.0)


def test_the_legend_sits_off_the_data(tmp_path: Path) -> None:
    records = [{"step": step, "loss": 3.0 / step} for step in range(1, 30)]
    records += [{"step": 10, "eval": {"mIoU": 0.2, "pixel_accuracy": 0.6}}, {"step": 29, "eval": {"mIoU": 0.4}}]
    figure = loss_figure(records, metrics=("mIoU", "pixel_accuracy"))
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["loss", "loss (smoothed)", "val mIoU", "val pixel_accuracy"]
    box = legend.get_window_extent(renderer)
    assert len(figure.axes) == 2  # the loss axes and the metric twin share one data area
    for axes in figure.axes:
        assert not box.overlaps(axes.get_window_extent(renderer)), (box, axes.get_window_extent(renderer))
    plot_loss_curve(records, tmp_path / "loss.png", metrics=("mIoU",))
    with Image.open(tmp_path / "loss.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 300


# -- class names of a mask folder ------------------------------------------------------------------------------------
def _mask_folder(root: Path) -> None:
    config = SyntheticConfig(image_size=64, num_classes=2)
    write_mask_folder(SyntheticSegmentation("train", num_images=2, config=config), root / "ti", root / "tm")
    write_mask_folder(SyntheticSegmentation("val", num_images=1, config=config), root / "vi", root / "vm")


def test_class_names_file_is_read_and_its_count_checked(tmp_path: Path) -> None:
    _mask_folder(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("# one name per class id\n\n background \ndisc\n  # a comment\nblock\n\n")
    assert read_class_names(names) == NAMES
    assert SegmentationFolder(tmp_path / "ti", tmp_path / "tm", num_classes=3, class_names_file=names).classes == NAMES
    short = tmp_path / "short.txt"
    short.write_text("background\ndisc\n")
    with pytest.raises(DataError, match=r"short\.txt: 2 class names found, 3 expected") as caught:
        SegmentationFolder(tmp_path / "ti", tmp_path / "tm", num_classes=3, class_names_file=short)
    assert caught.value.path == str(short)
    twice = tmp_path / "twice.txt"
    twice.write_text("a\nb\na\n")
    with pytest.raises(DataError, match=r"twice\.txt: class names \['a'\] appear more than once"):
        read_class_names(twice)
    with pytest.raises(DataError, match="class names file not found"):
        read_class_names(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="class_names_file is for dataset 'folder'"):
        build_datasets(DataSpec(class_names_file=str(names)), "detection")


@pytest.fixture(scope="module")
def named_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step segformer b0 run on a 64 px mask folder whose classes are named by --class-names."""
    root = tmp_path_factory.mktemp("named")
    _mask_folder(root)
    (root / "names.txt").write_text("# ids 0..2\n" + "\n".join(NAMES) + "\n")
    argv = ["--dataset", "folder", "--train-images", root / "ti", "--train-masks", root / "tm"]
    argv += ["--val-images", root / "vi", "--val-masks", root / "vm", "--class-names", root / "names.txt"]
    argv += "--model segformer_head --variant b0 --max-steps 1 --batch-size 1 --image-size 64 --num-classes 3".split()
    argv += ["--workers", 0, "--no-progress", "--no-eval", "--device", "cpu", "--output-dir", root / "run"]
    assert _run("train", argv) == 0
    return root


def test_class_names_reach_run_json_evaluation_and_predictions(named_run: Path, capsys) -> None:
    run = named_run / "run"
    record = json.loads((run / "run.json").read_text())
    assert tuple(record["model"]["class_names"]) == NAMES
    assert record["data"]["class_names_file"] == str(named_run / "names.txt")
    # Evaluating on the folder from the flags: the names come from run.json, no names file needed.
    val = ["--dataset", "folder", "--val-images", named_run / "vi", "--val-masks", named_run / "vm"]
    capsys.readouterr()
    assert _run("evaluate", ["--checkpoint", run, *val, "--no-progress", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)["metrics"]
    table = err.strip().splitlines()
    assert table[0].split() == ["class", "IoU"] and [line.split()[0] for line in table[1:]] == list(NAMES)
    for line, iou in zip(table[1:], metrics["iou"]):
        assert line.split()[1] == ("-" if math.isnan(iou) else f"{iou:.4f}")
    output = named_run / "pred"
    assert _run("predict", ["--checkpoint", run, "--input", named_run / "vi", "--output-dir", output, "--json"]) == 0
    (image,) = json.loads((output / "predictions.json").read_text())["images"]
    assert set(image["class_pixels"]) <= set(NAMES) and sum(image["class_pixels"].values()) == 64 * 64


def test_class_names_flag_is_for_mask_folders(tmp_path: Path, capsys) -> None:
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    argv = ["--dataset", "synthetic", "--max-steps", 1, "--class-names", names, "--output-dir", tmp_path / "run"]
    assert _run("train", argv) == EXIT_USAGE
    assert "--class-names is for --dataset folder" in capsys.readouterr().err


# -- palette masks and enlarged pictures -----------------------------------------------------------------------------
def test_mask_png_is_a_palette_image_of_class_ids(named_run: Path) -> None:
    output = named_run / "pred"  # written by the test above when run together; written here otherwise
    if not (output / "synthetic_val_000000_mask.png").is_file():
        argv = ["--checkpoint", named_run / "run", "--input", named_run / "vi", "--output-dir", output]
        assert _run("predict", argv) == 0
    model, spec = load_trained(named_run / "run")
    image = load_image(named_run / "vi" / "synthetic_val_000000.png")
    expected = predict(model, spec, image).classes.numpy()
    with Image.open(output / "synthetic_val_000000_mask.png") as mask:
        assert mask.mode == "P"
        assert np.array_equal(np.asarray(mask), expected)  # the raw ids, as tools reading class ids expect
        palette = mask.getpalette()
    colours = [tuple(palette[3 * i : 3 * i + 3]) for i in range(len(palette) // 3)]
    hex_colours = [tuple(int(code[i : i + 2], 16) for i in (1, 3, 5)) for code in PALETTE]
    assert colours[: len(PALETTE)] == hex_colours
    assert len(colours) == 256 and len(set(colours)) == 256  # ids past the palette: generated, distinct colours
    assert all(colours[i] == class_colour(i) for i in range(256))


def test_scale_enlarges_the_picture_only(named_run: Path, capsys) -> None:
    output = named_run / "scaled"
    argv = ["--checkpoint", named_run / "run", "--input", named_run / "vi", "--output-dir", output, "--json"]
    assert _run("predict", [*argv, "--scale", 2.5]) == 0
    with (
        Image.open(output / "synthetic_val_000000.png") as picture,
        Image.open(output / "synthetic_val_000000_mask.png") as mask,
    ):
        assert picture.size == (160, 160) and mask.size == (64, 64)
    (image,) = json.loads((output / "predictions.json").read_text())["images"]
    assert (image["width"], image["height"]) == (64, 64)
    for bad in ("0", "-1", "8.5", "nan"):
        capsys.readouterr()
        assert _run("predict", [*argv, "--scale", bad]) == EXIT_USAGE
        assert "--scale must be a finite number" in capsys.readouterr().err


def test_scaled_detections_keep_their_place() -> None:
    masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    masks[0, 5:10, 4:12] = True
    keypoints = torch.tensor([[[4.0, 5.0, 1.0], [11.0, 9.0, 0.0]]])
    found = Detections(torch.tensor([[4.0, 5.0, 12.0, 10.0]]), torch.tensor([0.9]), torch.tensor([1]), ("disc",))
    found = Detections(found.boxes, found.scores, found.labels, found.names, masks, keypoints)
    big = scale_prediction(found, 3.0)
    assert big.boxes.tolist() == [[12.0, 15.0, 36.0, 30.0]] and big.masks.shape == (1, 60, 90)
    assert big.masks[0].sum() == 9 * masks[0].sum() and big.masks[0, 15:30, 12:36].all()
    assert big.keypoints.tolist() == [[[12.0, 15.0, 1.0], [33.0, 27.0, 0.0]]]  # visibility unchanged
    assert draw(torch.rand(3, 20, 30), found, scale=3.0).shape == (3, 60, 90)
    segmentation = SegmentationMap(torch.tensor([[0, 1], [2, 1]]), ("a", "b", "c"))
    assert scale_prediction(segmentation, 2.0).classes.tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 1, 1]] * 2
    with pytest.raises(ValueError, match=r"scale must be a finite number in \(0, 8\], got 9"):
        draw(torch.rand(3, 20, 30), found, scale=9)


# -- RLE masks in the instance JSON ----------------------------------------------------------------------------------
def test_instance_json_holds_an_exact_rle_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 17, 23, generator=generator) > 0.6
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 20.0, 16.0]])
    found = Detections(boxes, torch.tensor([0.9, 0.6]), torch.tensor([1, 2]), ("disc", "block"), masks)
    items = json.loads(json.dumps(found.to_json()))  # what predictions.json holds
    for item, mask in zip(items, masks):
        rle = item["segmentation"]
        assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded, mask.numpy().astype(np.uint8))
        assert item["mask_area"] == int(mask.sum()) == int(mask_utils.area({**rle, "counts": rle["counts"].encode()}))


# -- AP per class ----------------------------------------------------------------------------------------------------
def _ground_truth() -> COCO:
    """One 100 px image: two circles, a square and two triangles; the category "star" has no ground truth."""
    categories = [{"id": i, "name": n} for i, n in ((1, "circle"), (2, "square"), (3, "triangle"), (7, "star"))]
    boxes = [
        (1, [5, 5, 20, 20]),
        (1, [60, 60, 25, 25]),
        (2, [40, 5, 20, 20]),
        (3, [5, 50, 30, 30]),
        (3, [60, 10, 20, 30]),
    ]
    annotations = [
        {"id": n, "image_id": 1, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for n, (c, box) in enumerate(boxes, 1)
    ]
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": categories}
    coco.dataset["annotations"] = annotations
    coco.createIndex()
    return coco


def test_per_class_ap_is_keyed_by_name_and_averages_to_the_map() -> None:
    coco = _ground_truth()
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9},  # circle: both found exactly
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 25, 25], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [0, 80, 10, 10], "score": 0.9},  # square: only a miss
        {"image_id": 1, "category_id": 3, "bbox": [5, 50, 30, 30], "score": 0.7},  # triangle: one of two
        {"image_id": 1, "category_id": 7, "bbox": [80, 0, 10, 10], "score": 0.9},  # star: no ground truth
    ]
    metrics = coco_evaluate(coco, results)
    per_class = metrics["bbox_per_class"]
    assert list(per_class) == ["circle", "square", "triangle"]  # star has no ground truth: left out
    assert per_class["circle"] == pytest.approx(1.0) and per_class["square"] == pytest.approx(0.0)
    assert per_class["triangle"] == pytest.approx(51 / 101)  # precision 1 up to recall 0.5 of the 101 points
    assert sum(per_class.values()) / len(per_class) == pytest.approx(metrics["bbox_mAP"])
    nothing = coco_evaluate(coco, [])
    assert nothing["bbox_per_class"] == {"circle": 0.0, "square": 0.0, "triangle": 0.0}


def test_coco_category_names_reach_metrics_and_predictions(tmp_path: Path) -> None:
    scenes = SyntheticShapes("val", num_images=1, config=SyntheticConfig(image_size=64))
    write_coco(scenes, tmp_path, tmp_path / "a.json")
    annotations = json.loads((tmp_path / "a.json").read_text())
    for category in annotations["categories"]:
        category["name"] = f"my_{category['name']}"
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    names = tuple(c["name"] for c in annotations["categories"])
    dataset = CocoDetection(tmp_path, tmp_path / "a.json")
    spec = ModelSpec.for_dataset("detection", "fasterrcnn", "b0", dataset, image_size=64, options=TINY_OPTIONS)
    assert spec.class_names == names  # what run.json records, and predict names labels by
    model = build_model(spec).eval()
    per_class = evaluate(model, dataset, spec)["bbox_per_class"]
    present = {names[dataset.category_ids.index(a["category_id"])] for a in annotations["annotations"]}
    assert set(per_class) == present
    found = predict(model, spec, dataset[0][0], score_threshold=0.0)
    items = found.to_json(spec.category_ids)
    assert all(names[item["label"] - 1] == item["name"] for item in items)
    assert all(spec.category_ids[item["label"] - 1] == item["category_id"] for item in items)
