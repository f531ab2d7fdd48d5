"""``pvt-predict`` and ``pvt-evaluate`` with wrong inputs: no input is ever written over, no two outputs share a
path, an unreadable image is skipped and reported, and every error is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pvt_backbone.cli import evaluate, predict
from pvt_backbone.cli.runner import EXIT_ERROR, EXIT_USAGE, run_command
from pvt_backbone.training.tasks import DataSpec
from pvt_backbone.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step b0 segmentation run on 64 px synthetic scenes (a picture and a mask per predicted image)."""
    output = tmp_path_factory.mktemp("predict") / "run"
    data = DataSpec(image_size=64, train_size=1, val_size=1)
    config = TrainConfig(
        output_dir=str(output),
        model="segformer_head",
        variant="b0",
        data=data,
        max_steps=1,
        batch_size=1,
        eval=False,
        workers=0,
        progress=False,
        device="cpu",
    )
    train(config)
    return output


def _image(path: Path, value: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), value, dtype=np.uint8)).save(path)
    return path.read_bytes()


def _predict(run: Path, source: Path, output: Path, *extra: str) -> int:
    argv = ["--checkpoint", str(run), "--input", str(source), "--output-dir", str(output), "--device", "cpu"]
    try:
        return run_command(predict.main, [*argv, *extra])
    except SystemExit as exit_info:  # argparse
        return int(exit_info.code or 0)


def test_output_dir_holding_inputs_is_refused_and_inputs_survive(
    seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    before = {name: _image(images / name, value) for name, value in (("a.png", 10), ("b.jpg", 200))}
    assert _predict(seg_run, images, images, "--json") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-dir" in err[0] and "a.png" in err[0], err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # nothing replaced, nothing added


def test_inputs_sharing_a_stem_get_distinct_outputs(
    seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, output = tmp_path / "images", tmp_path / "out"
    for name, value in (("a.jpg", 10), ("a.png", 250), ("a_mask.png", 120), ("b.png", 60)):
        _image(images / name, value)
    assert _predict(seg_run, images, output, "--json") == 0
    records = json.loads((output / "predictions.json").read_text())["images"]
    written = [(r["picture"], r["mask"]) for r in records]
    paths = [Path(p) for pair in written for p in pair]
    assert len(records) == 4 and len(set(paths)) == 8, written  # one picture and one mask each, no path twice
    assert sorted(p.name for p in output.iterdir()) == sorted([p.name for p in paths] + ["predictions.json"])
    by_input = {Path(r["file"]).name: Path(r["picture"]).name for r in records}
    assert by_input["b.png"] == "b.png"  # a stem no other input shares keeps its plain name
    assert len({by_input["a.jpg"], by_input["a.png"]}) == 2
    pictures = {name: np.asarray(Image.open(output / by_input[name])) for name in ("a.jpg", "a.png")}
    assert not np.array_equal(pictures["a.jpg"], pictures["a.png"])  # each drawing is of its own input
    assert "-> " in capsys.readouterr().out


def test_unreadable_image_is_skipped_and_reported(
    seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, output = tmp_path / "images", tmp_path / "out"
    _image(images / "good.png", 90)
    (images / "broken.jpg").write_bytes(b"not an image")
    assert _predict(seg_run, images, output, "--json") == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("broken.jpg" in line for line in err) == 1 and not any("good.png" in line for line in err), err
    report = json.loads((output / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in report["images"]] == ["good.png"]
    assert [Path(s["file"]).name for s in report["skipped"]] == ["broken.jpg"]
    assert "cannot read" in report["skipped"][0]["error"]
    assert (output / "good.png").is_file() and (output / "good_mask.png").is_file()


@pytest.mark.parametrize("command", [predict, evaluate])
def test_broken_run_json_is_one_line_naming_it(
    command: object, seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    _image(images / "a.png", 10)
    weights = next(seg_run.glob("checkpoints/step_*/model.safetensors"))
    for text in ("{not json", json.dumps({"model": {"task": "segmentation"}})):
        broken = tmp_path / "broken"
        broken.mkdir(exist_ok=True)
        (broken / "model.safetensors").write_bytes(weights.read_bytes())
        (broken / "run.json").write_text(text)
        if command is predict:
            status = _predict(broken / "model.safetensors", images, tmp_path / "out")
        else:
            status = run_command(evaluate.main, ["--checkpoint", str(broken), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == EXIT_ERROR
        assert len(err) == 1 and str(broken / "run.json") in err[0] and "Traceback" not in err[0], err


def test_evaluate_words_a_bad_setting_with_its_flag(seg_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(seg_run), "--device", "cpu", "--batch-size", "0"]
    assert run_command(evaluate.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0] and "batch_size" not in err[0], err
