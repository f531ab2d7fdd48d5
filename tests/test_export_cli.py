"""``pvt-export`` (tools/export.py): exports and verifies, and follows the error contract (1 error, 2 usage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pvt_backbone.cli.export import main
from pvt_backbone.cli.runner import run_command

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
