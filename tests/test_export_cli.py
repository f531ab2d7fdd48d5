"""``pvt-export`` (tools/export.py): exports and verifies, and follows the error contract (1 error, 2 usage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvt_backbone import export as export_module
from pvt_backbone.cli import export as export_cli
from pvt_backbone.cli.export import main
from pvt_backbone.cli.runner import EXIT_ERROR, EXIT_USAGE, run_command
from pvt_backbone.export import Verification

ROOT = Path(__file__).resolve().parents[1]


def test_exports_a_verified_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--variant", "b0", "--format", "pt2", "--size", "64x64", "--verify-size", "96x64:2", "--out"]
    assert run_command(main, [*argv, str(tmp_path / "b0")]) == 0
    assert (tmp_path / "b0.pt2").is_file()
    assert "max |export - eager|" in capsys.readouterr().out


def test_missing_weights_is_an_error_on_one_line(tmp_path: Path) -> None:
    argv = ["--variant", "b0", "--weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "x")]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), *argv], capture_output=True, text=True)
    assert result.returncode == 1
    assert "absent.pth" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("argv", "fragment"), [(["--size", "64"], "HEIGHTxWIDTH"), (["--size", "0x64"], "positive")])
def test_bad_size_is_a_usage_error(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--size", "64x64", "--verify-size", "32x32"], ["--verify-size 32x32", "64"]),
        (["--size", "64x64", "--verify-size", "16x64", "--static-size"], ["--verify-size 16x64", "29"]),
        (["--size", "64x64", "--verify-size", "96x64", "--static-size"], ["--verify-size 96x64", "--static-size"]),
        (["--size", "64x64", "--verify-size", "64x64:2", "--static-batch"], ["batch 2", "--static-batch"]),
        (["--size", "64x64", "--verify-size", "64x64", "--atol", "nan"], ["--atol"]),
    ],
)
def test_sizes_the_export_cannot_take_are_refused_before_exporting(
    argv: list[str],
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported before checking the sizes")

    monkeypatch.setattr(export_cli, "export_program", no_export)
    monkeypatch.setattr(export_cli, "export_onnx", no_export, raising=False)
    status = run_command(main, ["--variant", "b0", "--format", "pt2", *argv, "--out", str(tmp_path / "b0")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE, err
    assert len(err) == 1 and all(fragment in err[0] for fragment in fragments), err
    assert not list(tmp_path.iterdir())


def test_failed_verification_leaves_nothing_at_the_output_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def mismatch(program: object, model: object, x: torch.Tensor, *, atol: float = 1e-4) -> Verification:
        return Verification(tuple(x.shape), max_abs_diff=1.0, atol=atol)

    monkeypatch.setattr(export_module, "verify_program", mismatch)
    argv = ["--variant", "b0", "--format", "pt2", "--size", "64x64", "--verify-size", "64x64", "--out"]
    assert run_command(main, [*argv, str(tmp_path / "b0")]) == EXIT_ERROR
    assert not list(tmp_path.iterdir())  # neither the unverified file nor a temporary
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b0.pt2" in err[0] and "atol" in err[0], err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--model", "fasterrcnn", "--size", "64x64", "--verify-size", "192x192"], ["--size 64x64", "96"]),
        (["--model", "fasterrcnn", "--static-size", "--size", "64x64", "--verify-size", "96x64"], ["--verify-size"]),
        (["--model", "retinanet", "--size", "64x64", "--verify-size", "192x192"], ["--size 64x64", "160"]),
        (["--model", "fcos", "--size", "160x170", "--verify-size", "192x192"], ["--size 160x170", "32"]),
        (["--int8", "--format", "onnx"], ["--int8", "--to openvino"]),
    ],
)
def test_whole_model_sizes_and_int8_are_checked_first(
    argv: list[str], fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_command(main, ["--variant", "b0", *argv, "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE, err
    assert len(err) == 1 and all(fragment in err[0] for fragment in fragments), err
    assert not list(tmp_path.iterdir())


@pytest.mark.isolated
def test_openvino_int8_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    argv = ["--variant", "b0", "--to", "openvino", "--int8", "--calibration", "synthetic", "--calibration-size", "4"]
    argv += ["--size", "64x64", "--verify-size", "64x96:2", "--out", str(tmp_path / "b0")]
    assert run_command(main, argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.bin", "b0.int8.bin", "b0.int8.xml", "b0.xml"]
    out = capsys.readouterr().out
    assert "max |openvino - eager|" in out and "cosine similarity to fp32" in out, out
    cosine = float(out.split("cosine similarity to fp32 = ")[1].split()[0])
    assert 0.5 < cosine <= 1.0 + 1e-6, out


def test_int8_calibration_folder_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    argv = ["--variant", "b0", "--to", "openvino", "--int8", "--calibration", str(tmp_path / "absent")]
    argv += ["--size", "64x64", "--verify-size", "64x64", "--out", str(tmp_path / "out" / "b0")]
    assert run_command(main, argv) == EXIT_USAGE
    assert "absent" in capsys.readouterr().err
