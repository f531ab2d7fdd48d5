import os
import subprocess
import sys

import pytest
import torch

from pvt_backbone import PVTv2Config

# Set in the child process that runs an ``isolated`` test.
_ISOLATED_CHILD = "PVT_BACKBONE_ISOLATED_TEST"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run tests marked ``isolated`` in a fresh interpreter. Native libraries leave process-wide state behind that
    made a later ``signal.raise_signal(SIGTERM)`` in the same process segfault (seen after NNCF's quantization and,
    in a full run, after the OpenVINO/bf16 tests): the quantizing tests and the in-process signal test run alone."""
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(_ISOLATED_CHILD) == "1":
        return None
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    env = {**os.environ, _ISOLATED_CHILD: "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, cwd=pyfuncitem.config.rootpath
    )
    assert result.returncode == 0, f"{pyfuncitem.nodeid} failed in its own process:\n{result.stdout[-4000:]}"
    return True


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> PVTv2Config:
    """Four stages, one block each, narrow: builds and runs in milliseconds."""
    return PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
