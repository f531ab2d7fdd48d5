"""Every command keeps one error contract: exit 0, 1 with one line, 2 for usage, 130 on Ctrl-C; ``--debug`` shows the
traceback."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pvt_backbone.cli.runner import UsageError, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _module(target: str):
    return importlib.import_module(target.partition(":")[0])


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_documents_debug_and_rejects_unknown_flags(command: str, capsys) -> None:
    module = _module(SCRIPTS[command])
    assert "--debug" in module.build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and ": error: " in err  # required arguments or the unknown flag


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ValueError("bad\nvalue"), 1),
        (RuntimeError("torch said no"), 1),
        (UsageError("wrong mix"), 2),
        (KeyboardInterrupt(), 130),
    ],
)
def test_statuses_and_one_line(error: BaseException, status: int, capsys) -> None:
    def main(argv):
        raise error

    assert run_command(main, []) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if isinstance(error, RuntimeError):
        assert "RuntimeError: torch said no" in err  # unexpected errors keep their type's name


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    script = str(ROOT / "tools" / "convert_weights.py")
    missing = str(tmp_path / "absent.pth")
    plain = subprocess.run([sys.executable, script, "--inspect", missing], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(
        [sys.executable, script, "--inspect", missing, "--debug"], capture_output=True, text=True, timeout=120
    )
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_warnings_are_one_line(capsys) -> None:
    import warnings

    def main(argv):
        warnings.warn("data.json: 3 annotations had no 'area';\nderived from their masks", stacklevel=1)
        return 0

    assert run_command(main, []) == 0
    err = capsys.readouterr().err
    assert err.strip().endswith("warning: data.json: 3 annotations had no 'area'; derived from their masks")
    assert len(err.strip().splitlines()) == 1
