"""The converter command (pvt_backbone.cli.convert, tools/convert_weights.py): conversions between all layouts,
--inspect, exit codes (1 error, 2 usage) and messages."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pvt_backbone import CheckpointError, PVTv2, PVTv2Backbone, PVTv2Config
from pvt_backbone.cli.convert import main
from pvt_backbone.cli.convert import run as run_entry_point
from pvt_backbone.cli.runner import run_command
from pvt_backbone.weights import from_native

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "convert_weights.py"
TINY = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command under the error contract; stderr without the ``<prog>: ``."""
    code = run_command(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    prog = os.path.basename(sys.argv[0])
    assert err == "" or err.startswith(f"{prog}: error: "), err
    return code, out, err.removeprefix(f"{prog}: ")


@pytest.fixture
def native() -> dict[str, Tensor]:
    model = PVTv2(TINY, num_classes=5)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def pvt_file(native: dict[str, Tensor], tmp_path: Path) -> Path:
    path = tmp_path / "pvt_v2_tiny.pth"
    torch.save(from_native(native, "pvt").state_dict, path)
    return path


def test_convert_through_every_layout_and_back(
    capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], pvt_file: Path, tmp_path: Path
) -> None:
    current = pvt_file
    for target in ("timm", "hf", "lucid", "pvt", "classifier"):
        output = tmp_path / f"{target}.safetensors"
        code, out, err = run(capsys, current, output, "--to", target)
        assert (code, err) == (0, "")
        assert f"wrote {output}: layout {'timm' if target == 'classifier' else target}" in out
        with safe_open(output, "pt") as handle:
            assert handle.metadata()["pvt_backbone.source"] == current.name
        current = output
    final = load_file(current)
    assert final.keys() == native.keys()
    assert all(torch.equal(final[k], v) for k, v in native.items())


def test_default_is_backbone_and_reports_the_dropped_head(
    capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], pvt_file: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, pvt_file, tmp_path / "bb.safetensors")
    assert code == 0
    assert "read  " in out and "layout pvt" in out
    assert "dropped 2 (--to backbone writes no classifier head): head.weight, head.bias" in out
    backbone = PVTv2Backbone(TINY, weights=tmp_path / "bb.safetensors")
    assert torch.equal(backbone.stages[3].norm.weight.detach(), native["stages.3.norm.weight"])


def test_mmdet_output_and_forced_input_layout(
    capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], pvt_file: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, pvt_file, tmp_path / "mm.safetensors", "--to", "mmdet")
    assert code == 0 and "fused attn.q + attn.kv -> attn.attn.in_proj_*" in out
    assert "dropped 2 (the mmdet layout has no classifier head)" in out
    code, out, _ = run(capsys, tmp_path / "mm.safetensors", tmp_path / "back.safetensors", "--from", "mmdet")
    assert code == 0
    back = load_file(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in native.items() if not k.startswith("head."))
    code, _, err = run(capsys, tmp_path / "mm.safetensors", tmp_path / "x.safetensors", "--from", "hf")
    assert code == 1 and "cannot find exactly one set of hf keys" in err


def test_dtype_option(capsys: pytest.CaptureFixture[str], pvt_file: Path, tmp_path: Path) -> None:
    code, _, _ = run(capsys, pvt_file, tmp_path / "half.safetensors", "--dtype", "bfloat16")
    assert code == 0
    assert {t.dtype for t in load_file(tmp_path / "half.safetensors").values()} == {torch.bfloat16}


def test_inspect(capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = PVTv2Backbone.b0().state_dict()
    b0 = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    b0["head.weight"], b0["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    hf = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in from_native(b0, "hf").state_dict.items()}, hf)
    code, out, err = run(capsys, "--inspect", hf)
    assert (code, err) == (0, "")
    assert "layout:     hf" in out
    assert "variant:    b0" in out
    assert "parameters: 3,666,760 in 178 native tensors (float32; 194 tensors in the file)" in out
    assert "head:       1000 classes" in out
    code, out, _ = run(capsys, "--inspect", hf, "--variant", "b0")
    assert code == 0
    code, _, err = run(capsys, "--inspect", hf, "--variant", "b2")
    assert code == 1 and "not PVTv2-b2; it holds PVTv2-b0" in err


def test_variant_check_on_conversion(capsys: pytest.CaptureFixture[str], pvt_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.safetensors"
    code, _, err = run(capsys, pvt_file, output, "--variant", "b0")
    assert code == 1
    assert err.startswith("error: the checkpoint is not PVTv2-b0") and "shape/dtype mismatch" in err
    assert not output.exists()


def test_errors_exit_nonzero_and_keep_existing_output(
    capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], pvt_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"keep me")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(pvt_file.read_bytes()[:100])
    body_only = tmp_path / "body.safetensors"
    save_file({k: v for k, v in native.items() if not k.startswith("head.")}, body_only)
    cases = [
        ((tmp_path / "missing.pth", output), "weights file not found"),
        ((corrupt, output), "truncated or corrupt"),
        ((body_only, output, "--to", "classifier"), "has no classifier head; --to classifier needs one"),
        ((pvt_file, tmp_path / "out.pth"), "must end with .safetensors"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        assert err.startswith("error: ") and message in err, err
        assert "Traceback" not in err and out == ""
    assert output.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "body.safetensors",
        "corrupt.pth",
        "out.safetensors",
        "pvt_v2_tiny.pth",
    ]


def test_linear_sra_cannot_go_to_mmdet(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    linear = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), linear=True)
    save_file(PVTv2Backbone(linear).state_dict(), tmp_path / "li.safetensors")
    code, _, err = run(capsys, tmp_path / "li.safetensors", tmp_path / "mm.safetensors", "--to", "mmdet")
    assert code == 1 and "no linear SRA" in err


def test_trust_pickle_flag(capsys: pytest.CaptureFixture[str], native: dict[str, Tensor], tmp_path: Path) -> None:
    path = tmp_path / "train.pth"
    torch.save({"model": native, "args": argparse.Namespace(epochs=300)}, path)
    code, _, err = run(capsys, path, tmp_path / "out.safetensors")
    assert code == 1 and "--trust-pickle" in err and "argparse.Namespace" in err
    assert "trust_pickle=True" not in err  # the command words the library's parameter as its flag
    code, out, _ = run(capsys, path, tmp_path / "out.safetensors", "--trust-pickle")
    assert code == 0 and "['args']" in out


def test_timm_features_target_loads_into_timm_features_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    source = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in PVTv2Backbone.b0().state_dict().items()}, source)
    output = tmp_path / "features.safetensors"
    code, out, _ = run(capsys, source, output, "--to", "timm_features")
    assert code == 0 and "layout timm_features" in out
    reference = timm.create_model("pvt_v2_b0", features_only=True, pretrained=False)
    reference.load_state_dict(load_file(output), strict=True)
    code, out, _ = run(capsys, output, tmp_path / "back.safetensors", "--from", "timm_features")
    assert code == 0 and load_file(tmp_path / "back.safetensors").keys() == load_file(source).keys()


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], pvt_file: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, pvt_file, tmp_path / "o.safetensors", "--variant", "b1")
    assert code == 1 and out == ""
    assert err.startswith("error: the checkpoint is not PVTv2-b1") and "mismatch" in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], pvt_file: Path) -> None:
    for argv in ([pvt_file], ["--inspect", pvt_file, pvt_file], [pvt_file, "o.safetensors", "--to", "onnx"]):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 2
        with pytest.raises(SystemExit) as info:  # the wrapper lets argparse's exit through
            run_command(main, [str(a) for a in argv])
        assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_main_raises_library_errors_for_the_wrapper_to_word(pvt_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        main([str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")])
    with pytest.raises(CheckpointError, match="not PVTv2-b0") as info:
        main([str(pvt_file), str(tmp_path / "o.safetensors"), "--variant", "b0"])
    assert info.value.__cause__ is None  # no parameter named in it: re-raised as it is
    body_only = tmp_path / "body.safetensors"
    run_command(main, [str(pvt_file), str(body_only)])
    with pytest.raises(CheckpointError, match="--to classifier needs one") as info:
        main([str(body_only), str(tmp_path / "o.safetensors"), "--to", "classifier"])
    assert 'to="classifier"' in str(info.value.__cause__)  # the library's own wording, kept as the cause


def test_entry_point_exits_with_the_status(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pvt_file: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["pvt-convert", "--inspect", str(tmp_path / "absent.pth")])
    with pytest.raises(SystemExit) as info:
        run_entry_point()
    assert info.value.code == 1
    assert capsys.readouterr().err.startswith("pvt-convert: error: weights file not found")
    monkeypatch.setattr(sys, "argv", ["pvt-convert", "--inspect", str(pvt_file)])
    with pytest.raises(SystemExit) as info:
        run_entry_point()
    assert info.value.code == 0 and "layout:     pvt" in capsys.readouterr().out


def test_shim_script_imports_without_running() -> None:
    spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
    assert spec is not None and spec.loader is not None
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)  # no parse, no exit: only ``__main__`` runs the command
    assert shim.main is main


def test_script_fails_cleanly_as_a_program(tmp_path: Path) -> None:
    """The real entry point (starting Python with torch is slow): status 1 with one line, 2 with the usage."""
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "none.pth"), str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("convert_weights.py: error: weights file not found") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stdout == ""
    assert not (tmp_path / "o.safetensors").exists()
    usage = subprocess.run([sys.executable, str(SCRIPT), "--dtype", "int8"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: convert_weights.py") and usage.stdout == ""
    assert "invalid choice: 'int8'" in usage.stderr
