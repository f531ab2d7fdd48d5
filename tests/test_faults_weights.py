"""Faults around weights and inputs: files that do not fit, corrupt and code-carrying files at every entry point,
empty batches, wrong input dtypes, and writes killed half-way."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pvt_backbone import CheckpointError, PVTv2Backbone, PVTv2Config, create_model, load_weights, pvt_v2_b0
from pvt_backbone.cli.convert import main as convert_main
from pvt_backbone.cli.runner import one_line, run_command
from pvt_backbone.segmentation import semantic_fpn_pvt_v2
from pvt_backbone.weights import load_model_weights, read_checkpoint
from pvt_backbone.weights.converter import convert_checkpoint, inspect_checkpoint
from pvt_backbone.weights.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
TINY = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


def zeros_like_backbone(variant: str = "b0") -> dict[str, Tensor]:
    """A backbone state dict of zeros, built on the meta device first (no init cost)."""
    with torch.device("meta"):
        shapes = PVTv2Backbone(variant).state_dict()
    return {key: torch.zeros(value.shape) for key, value in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Conversion without variant= checks the inferred variant
# ---------------------------------------------------------------------------------------------------------------------


def test_conversion_without_variant_checks_every_key_of_the_inferred_variant(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = zeros_like_backbone()
    broken = dict(good)
    del broken["stages.1.blocks.1.attn.q.bias"]  # not a key the architecture is inferred from
    broken["stages.2.blocks.0.norm1.weight"] = torch.zeros(7)
    source = tmp_path / "broken.safetensors"
    save_file(broken, source)
    output = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(source, output)
    message = str(info.value)
    assert "PVTv2-b0" in message
    assert "stages.1.blocks.1.attn.q.bias" in message and "stages.2.blocks.0.norm1.weight" in message
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]

    code = run_command(convert_main, [str(source), str(output)])
    _, err = capsys.readouterr()
    assert code == 1 and "stages.1.blocks.1.attn.q.bias" in err and not output.exists()

    text = inspect_checkpoint(source).format()
    assert "variant:    b0" not in text
    assert "does not fit PVTv2-b0" in text and "stages.1.blocks.1.attn.q.bias" in text
    code = run_command(convert_main, ["--inspect", str(source)])
    out, _ = capsys.readouterr()
    assert code == 0 and "does not fit PVTv2-b0" in out and "stages.2.blocks.0.norm1.weight" in out

    save_file(good, tmp_path / "good.safetensors")  # the intact file still converts and is labelled b0
    report = convert_checkpoint(tmp_path / "good.safetensors", output)
    assert report.written.variant == "b0" and "variant:    b0" in inspect_checkpoint(output).format()


def test_conversion_of_a_custom_configuration_checks_its_own_shapes(tmp_path: Path) -> None:
    state = PVTv2Backbone(TINY).state_dict()
    save_file(state, tmp_path / "tiny.safetensors")
    assert convert_checkpoint(tmp_path / "tiny.safetensors", tmp_path / "out.safetensors").written.variant is None
    del state["stages.0.blocks.0.mlp.fc2.bias"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.mlp\.fc2\.bias"):
        convert_checkpoint(tmp_path / "broken.safetensors", tmp_path / "out2.safetensors")
    assert not (tmp_path / "out2.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: empty batches and dtypes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast_inference", "plain", "training"])
def test_empty_batch_gives_empty_outputs_on_every_path(path: str) -> None:
    backbone, classifier = PVTv2Backbone.b0(), pvt_v2_b0(num_classes=7)
    segmenter = semantic_fpn_pvt_v2("b0", num_classes=5)
    models: list[Any] = [backbone, classifier, segmenter.backbone]
    for model in (backbone, classifier, segmenter):
        model.train(path == "training")
    if path == "plain":
        for model in models:
            model.set_fast_inference(False)
    x = torch.rand(0, 3, 64, 96)
    with torch.set_grad_enabled(path == "training"):
        maps = backbone(x)
        logits = classifier(x)
        masks = segmenter(x)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "0": (0, 32, 16, 24),
        "1": (0, 64, 8, 12),
        "2": (0, 160, 4, 6),
        "3": (0, 256, 2, 3),
    }
    assert tuple(logits.shape) == (0, 7) and tuple(masks.shape) == (0, 5, 64, 96)
    assert all(m.dtype == torch.float32 for m in [*maps.values(), logits, masks])
    if path == "training":  # still part of the graph: an empty batch backpropagates zero gradients
        (sum(m.sum() for m in maps.values()) + logits.sum()).backward()
        assert backbone.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtype_other_than_the_model_is_a_clear_type_error(dtype: torch.dtype) -> None:
    backbone, classifier = PVTv2Backbone(TINY).eval(), pvt_v2_b0(num_classes=3).eval()
    for model in (backbone, classifier):
        with pytest.raises(TypeError) as info:
            model(torch.rand(1, 3, 64, 64, dtype=dtype))
        message = str(info.value)
        assert str(dtype) in message and "torch.float32" in message and "x.to(torch.float32)" in message
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are what autocast is for, but for float64
        if dtype == torch.float64:
            with pytest.raises(TypeError, match="torch.float64"):
                backbone(torch.rand(1, 3, 64, 64, dtype=dtype))
        else:
            assert tuple(backbone(torch.rand(1, 3, 64, 64, dtype=dtype))["3"].shape) == (1, 32, 2, 2)
    assert backbone.double()(torch.rand(1, 3, 64, 64, dtype=torch.float64))["3"].dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Messages: refused pickles, garbage, safetensors under a .pth name, mismatches on one line
# ---------------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _code_pickle(tmp_path: Path, kind: str, marker: Path) -> Path:
    """A checkpoint whose loading would run ``open(marker, "w")``, in torch's zip or legacy format."""
    state = {"model": PVTv2Backbone(TINY).state_dict(), "trap": _Payload(marker)}
    path = tmp_path / f"code_{kind}.pth"
    torch.save(state, path, _use_new_zipfile_serialization=kind == "zip")
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_code_pickle_refusal_names_the_globals(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _code_pickle(tmp_path, kind, marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "io.open" in message and "trust_pickle=True" in message
    assert "truncated or corrupt" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["random bytes", "text", "plain pickle", "truncated zip"])
def test_garbage_is_not_a_checkpoint_and_gets_no_trust_hint(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "text":
        path.write_text("hello world, this is not a checkpoint\n")
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"trap": _Payload(tmp_path / "MARKER")}))
    else:
        torch.save(PVTv2Backbone(TINY).state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    for trust in (False, True):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path, trust_pickle=trust)
        message = str(info.value)
        assert f"cannot read {path}" in message and "trust_pickle" not in message
        if kind != "truncated zip":
            assert "not a checkpoint" in message and "not safetensors" in message and "not a torch" in message
        else:
            assert "truncated or corrupt" in message
    assert not (tmp_path / "MARKER").exists()


def test_safetensors_under_a_pth_name_is_read_as_safetensors(tmp_path: Path) -> None:
    state = PVTv2Backbone(TINY).state_dict()
    save_file(state, tmp_path / "weights.pth", metadata={"note": "renamed"})
    checkpoint = read_checkpoint(tmp_path / "weights.pth")
    assert checkpoint.content.keys() == state.keys() and checkpoint.metadata == {"note": "renamed"}
    model = PVTv2Backbone(TINY, weights=tmp_path / "weights.pth")
    assert torch.equal(model.patch_embed.proj.weight.detach(), state["patch_embed.proj.weight"])


def test_weights_mismatch_reads_well_on_one_line() -> None:
    errors = []
    for build in (
        lambda: semantic_fpn_pvt_v2("b0", num_classes=3, weights_backbone=zeros_like_backbone("b1")),
        lambda: PVTv2Backbone.b0(weights=zeros_like_backbone("b1")),
        lambda: create_model("semantic_fpn_pvt_v2_b0", num_classes=3, weights=zeros_like_backbone()),
    ):
        with pytest.raises(CheckpointError) as info:
            build()
        errors.append(info.value)
    for error in errors:
        assert "\n" in str(error)  # the library's message is multi-line
        line = one_line(error)
        assert "\n" not in line and line.startswith("cannot load <state dict> into ")
        assert not any(bad in line for bad in (": ;", ";;", "; ;", "  ", ":;", ". ;"))
        assert line.endswith("Nothing was loaded; the model is unchanged.")
    # constructors take no strict=: the way to load what fits is load_weights
    assert "strict=False" not in one_line(errors[0]) or "load_weights(" in one_line(errors[0])
    assert "weights_backbone=" in one_line(errors[2])


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt and code-carrying files at every entry point
# ---------------------------------------------------------------------------------------------------------------------


def _convert(path: Path) -> None:
    """``pvt-convert PATH OUT``: its one-line error re-raised as CheckpointError, so every entry point reads alike."""
    output = path.with_name("converted.safetensors")
    code = run_command(convert_main, [str(path), str(output)])
    if code != 0:
        raise CheckpointError("pvt-convert failed")
    assert not output.exists()


ENTRY_POINTS: dict[str, Callable[[Path], object]] = {
    "read_checkpoint": read_checkpoint,
    "load_weights": lambda path: load_weights(PVTv2Backbone(TINY), path),
    "PVTv2Backbone.b0": lambda path: PVTv2Backbone.b0(weights=path),
    "pvt_v2_b0": lambda path: pvt_v2_b0(weights=path),
    "create_model": lambda path: create_model("pvt_v2_b0_backbone", weights=path),
    "create_model segmenter": lambda path: create_model("semantic_fpn_pvt_v2_b0", num_classes=2, weights=path),
    "load_model_weights": lambda path: load_model_weights(nn.Linear(2, 3), path),
    "pvt-convert": _convert,
}


def _corrupt(tmp_path: Path, kind: str) -> Path:
    state = PVTv2Backbone(TINY).state_dict()
    if kind == "truncated safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, path)
    elif kind == "truncated pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    else:  # a safetensors header claiming more bytes than there are, under a .pth name
        path = tmp_path / "w.pth"
        save_file(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_corrupt_files_fail_cleanly_at_every_entry_point(
    entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("truncated safetensors", "truncated pth", "truncated safetensors named pth"):
        path = _corrupt(tmp_path, kind)
        with pytest.raises(CheckpointError) as info:
            ENTRY_POINTS[entry](path)
        message = str(info.value) if entry != "pvt-convert" else capsys.readouterr().err
        assert "truncated or corrupt" in message and "trust" not in message, (kind, message)
        path.unlink()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_code_pickles_never_run_at_any_entry_point(
    entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "MARKER"
    for kind in ("zip", "legacy"):
        path = _code_pickle(tmp_path, kind, marker)
        with pytest.raises(CheckpointError) as info:
            ENTRY_POINTS[entry](path)
        message = str(info.value) if entry != "pvt-convert" else capsys.readouterr().err
        assert "io.open" in message and "trust" in message, message
        assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The atomic writer: PIDs in temp names, leftovers of dead writers, the umask
# ---------------------------------------------------------------------------------------------------------------------


def _temps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def test_temp_file_carries_the_pid_and_the_mode_honours_the_umask(tmp_path: Path) -> None:
    seen: list[str] = []
    previous = os.umask(0o027)
    try:
        target = atomic_write(tmp_path / "a.txt", lambda temp: seen.append(temp.name) or temp.write_text("x"))
    finally:
        os.umask(previous)
    assert f".{os.getpid()}." in seen[0] and seen[0].startswith(".a.txt.") and seen[0].endswith(".txt")
    assert target.stat().st_mode & 0o777 == 0o640
    explicit = atomic_write(tmp_path / "b.txt", lambda temp: temp.write_text("x"), mode=0o600)
    assert explicit.stat().st_mode & 0o777 == 0o600


_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from pvt_backbone.weights.io import atomic_write

def write(temp: Path) -> None:
    with open(temp, "wb") as handle:
        handle.write(b"new" * 100_000)
        handle.flush()
        # tell the test where we are (renamed, so it never reads a half-written name), then hang mid-write
        Path(sys.argv[2] + ".part").write_text(temp.name)
        os.replace(sys.argv[2] + ".part", sys.argv[2])
        time.sleep(60)

atomic_write(sys.argv[1], write)
"""


def test_killed_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, target)
    old = target.read_bytes()
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the writer never reached the middle of its write"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    leftovers = _temps(tmp_path)
    assert [p.name for p in leftovers] == [ready.read_text()] and f".{process.pid}." in leftovers[0].name
    assert leftovers[0].stat().st_size == 300_000
    assert target.read_bytes() == old

    alive = tmp_path / f".{target.name}.{os.getpid()}.feed.tmp.safetensors"  # a live writer's temp is kept
    alive.write_bytes(b"busy")
    save_file({"w": torch.zeros(3)}, tmp_path / "other.safetensors")
    atomic_write(target, lambda temp: save_file({"w": torch.full((3,), 2.0)}, temp))
    assert torch.equal(load_file(target)["w"], torch.full((3,), 2.0))
    assert _temps(tmp_path) == [alive]
