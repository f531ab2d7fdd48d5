"""Training faults: a resume with changed settings, non-finite weights, a full disk, file modes, a stopped DDP peer,
SyncBatchNorm where it cannot run: each is refused or reported clearly, and nothing good is lost."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fractions
import json
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from tiny_runs import TINY_DATA, tiny_run_config
from torch import nn

from pvt_backbone.training import checkpoint as ckpt
from pvt_backbone.training import distributed, trainer
from pvt_backbone.training.trainer import SettingsError, TrainConfig, train
from pvt_backbone.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _tiny(output_dir: Path, **overrides) -> TrainConfig:
    """A two-step run, checkpointed after each step."""
    return tiny_run_config(output_dir, **{"max_steps": 2, "save_every": 1, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run, written under umask 022."""
    output = tmp_path_factory.mktemp("faults") / "run"
    previous = os.umask(0o022)
    try:
        train(_tiny(output))
    finally:
        os.umask(previous)
    return output


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(run.rglob("*"))}


# -- 1. a resume compares every setting that changes the run ---------------------------------------------------------
RESUME_CHANGES = [
    ({"lr": 2e-4}, "lr is 0.0002 here but 0.001"),
    ({"weight_decay": 0.1}, "weight_decay is 0.1 here but 0.05"),
    ({"backbone_lr_mult": 0.1}, "backbone_lr_mult is 0.1 here but 1.0"),
    ({"seed": 3}, "seed is 3 here but 0"),
    ({"amp": True}, "amp is True here but False"),
    ({"clip_grad": 0.5}, "clip_grad is 0.5 here but 1.0"),
    ({"trainable_stages": 2}, "trainable_stages is 2 here but 4"),
    ({"batch_size": 2}, "batch_size is 2 here but 1"),
    ({"variant": "b1"}, "variant is 'b1' here but 'b0'"),
    ({"data": dataclasses.replace(TINY_DATA, train_size=9)}, "data.train_size is 9 here but 8"),
    ({"data": dataclasses.replace(TINY_DATA, seed=1)}, "data.seed is 1 here but 0"),
    ({"warmup_steps": 2}, "warmup_steps is 2 here but 1"),
    ({"schedule": "poly"}, "schedule is 'poly' here but 'cosine'"),
    ({"max_steps": 5}, "max_steps is 5 steps here but 2 steps"),
]


@pytest.mark.parametrize(("change", "message"), RESUME_CHANGES, ids=[m.split()[0] for _, m in RESUME_CHANGES])
def test_resume_refuses_a_changed_setting_naming_both_values(finished_run: Path, change: dict, message: str) -> None:
    before = _snapshot(finished_run)
    with pytest.raises(SettingsError, match=rf"^resume=True: {message} in the run being resumed") as refused:
        train(_tiny(finished_run, resume=True, **change))
    assert "\n" not in str(refused.value)
    assert _snapshot(finished_run) == before  # run.json, the log and the checkpoints are untouched


def test_resume_names_every_changed_setting_on_one_line(finished_run: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        train(_tiny(finished_run, resume=True, lr=2e-4, seed=5, amp=True))
    assert str(refused.value) == (
        "resume=True: lr is 0.0002 here but 0.001 in the run being resumed; amp and seed differ too"
    )
    assert refused.value.settings == ("resume=True", "lr", "amp", "seed")


def test_resume_accepts_cadence_changes_and_records_only_what_the_run_uses(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = json.loads((run / "run.json").read_text())
    cadence = {"log_every": 5, "keep_checkpoints": 3, "eval_every": 7, "save_every": 0, "dist_timeout": 30.0}
    train(_tiny(run, resume=True, device="cpu", **cadence))
    record = json.loads((run / "run.json").read_text())
    assert {name: record["train"][name] for name in cadence} == cadence
    assert record["model"] == saved["model"] and record["data"] == saved["data"]
    changed = {name for name in record["train"] if record["train"][name] != saved["train"][name]}
    assert changed == {*cadence, "device", "resume", "output_dir"}  # the copy lives elsewhere


def test_every_setting_is_compared_or_allowed_to_differ() -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    compared, scheduled, free = trainer._RESUME_COMPARED, trainer._RESUME_SCHEDULED, trainer._RESUME_MAY_DIFFER
    assert sorted(compared + scheduled + free) == sorted(names)  # each field exactly once
    for name in free:
        assert f"``{name}``" in TrainConfig.__doc__  # documented as allowed to differ


# -- 2. non-finite weights are never saved -----------------------------------------------------------------------------
def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def _save(root: Path, step: int, net: nn.Module) -> ckpt.RunCheckpoint:
    return ckpt.save_checkpoint(root, step=step, model=net, state={"step": step}, run={"model": "net"})


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    _save(tmp_path, 1, _net(0))
    before = _snapshot(tmp_path)
    bad = _net(1)
    bad[1].running_var[2] = float("inf")  # a buffer, not a parameter
    bad[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^cannot save step 2: 1\.running_var holds 1 non-finite value") as refused:
        _save(tmp_path, 2, bad)
    assert "nothing was written" in str(refused.value) and "\n" not in str(refused.value)
    assert _snapshot(tmp_path) == before and ckpt.latest_checkpoint(tmp_path).step == 1


def test_training_stops_before_checkpointing_non_finite_weights(tmp_path: Path, monkeypatch) -> None:
    one_step = trainer._train_step

    def poisoned(run, batches):
        stats = one_step(run, batches)
        with torch.no_grad():
            run.model.roi_heads.box_predictor.cls_score.weight[0, 0] = float("inf")  # what a diverging step leaves
        return stats

    monkeypatch.setattr(trainer, "_train_step", poisoned)
    with pytest.raises(ValueError, match=r"cannot save step 1: roi_heads\.box_predictor\.cls_score\.weight holds"):
        train(_tiny(tmp_path / "run", max_steps=1))
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "run" / "checkpoints").exists()


# -- 3. a full disk says so; an unreadable training state is one line ------------------------------------------------
def _torch_full_disk(_obj, path, *args, **kwargs):
    Path(path).write_bytes(b"\x00partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _safetensors_full_disk(_tensors, path, metadata=None):
    Path(path).write_bytes(b"\x00partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _os_full_disk(_obj, path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "errno"])
def test_a_full_disk_during_a_checkpoint_says_so(tmp_path: Path, monkeypatch, writer: str) -> None:
    _save(tmp_path, 1, _net(0))
    if writer == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", _torch_full_disk)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    elif writer == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", _safetensors_full_disk)
    else:
        monkeypatch.setattr(ckpt.torch, "save", _os_full_disk)
    with pytest.raises(OSError, match="no space left on device") as refused:
        _save(tmp_path, 2, _net(1))
    message = str(refused.value)
    assert refused.value.errno == errno.ENOSPC and str(tmp_path / "checkpoints") in message and "\n" not in message
    assert "inline_container" not in message
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.step == 1 and not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt.load_run_weights(_net(5), latest.weights)


def test_another_write_failure_is_not_called_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    def failing(_obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(ckpt.torch, "save", failing)
    with pytest.raises(OSError, match=r"cannot write the checkpoint of step 2 in .*: \[enforce fail") as refused:
        _save(tmp_path, 2, _net(1))
    assert "no space" not in str(refused.value)


FULL_DISK_SCRIPT = """
import json, sys
import torch
from torch import nn
from pvt_backbone.training import checkpoint as ckpt
root = sys.argv[1]
def save(step, net, extra):
    state = {"step": step, "moments": torch.ones(extra)}
    return ckpt.save_checkpoint(root, step=step, model=net, state=state, run={"model": "net"})
save(1, nn.Linear(4, 4), 4)
outcome = []
# On a 256 KiB file system: 400 KB of state (torch.save fails), then 256 KiB of weights (safetensors fails).
for step, net, extra in [(2, nn.Linear(4, 4), 100_000), (3, nn.Linear(256, 256), 4)]:
    try:
        save(step, net, extra)
        outcome.append({"error": None})
    except OSError as error:
        outcome.append({"error": str(error), "errno": error.errno, "cause": type(error.__cause__).__name__})
    outcome[-1]["latest"] = ckpt.latest_checkpoint(root).step
ckpt.load_run_weights(nn.Linear(4, 4), ckpt.latest_checkpoint(root).weights)
print(json.dumps(outcome))
"""


def test_a_full_tmpfs_during_a_checkpoint_says_so(tmp_path: Path) -> None:
    """The real thing, where a private mount namespace allows a small tmpfs (root or user namespaces)."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k none {mount}"]
    try:
        allowed = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    if not allowed:
        pytest.skip("cannot mount a tmpfs here (needs unshare and a mount namespace)")
    (tmp_path / "script.py").write_text(FULL_DISK_SCRIPT)
    shell = 'mount -t tmpfs -o size=256k none "$1" && exec "$2" "$3" "$1"'
    command = ["unshare", "-rm", "sh", "-c", shell, "sh", str(mount), sys.executable, str(tmp_path / "script.py")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    state_full, weights_full = json.loads(done.stdout.strip().splitlines()[-1])
    assert state_full["cause"] == "RuntimeError" and weights_full["cause"] == "SafetensorError"  # both writers
    for outcome in (state_full, weights_full):
        assert outcome["errno"] == errno.ENOSPC and outcome["latest"] == 1
        assert "no space left on device" in outcome["error"] and f"{mount}/checkpoints" in outcome["error"]


@pytest.mark.parametrize("damage", ["garbage", "code pickle", "no optimizer", "foreign optimizer"])
def test_an_unusable_training_state_is_refused_in_one_line(finished_run: Path, tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = ckpt.latest_checkpoint(run).state
    state = torch.load(path, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"\x00 not a torch file")
    elif damage == "code pickle":
        torch.save({**state, "step": fractions.Fraction(2)}, path)  # loading it would run code
    elif damage == "no optimizer":
        del state["optimizer"]
        torch.save(state, path)
    else:
        state["optimizer"] = torch.optim.AdamW(nn.Linear(2, 2).parameters()).state_dict()
        torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"state\.pt") as refused:
        train(_tiny(run, resume=True))
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


# -- 4. files and directories follow the umask -----------------------------------------------------------------------
def test_run_outputs_follow_the_umask(finished_run: Path, tmp_path: Path) -> None:
    modes = {str(p.relative_to(finished_run)): stat.S_IMODE(p.stat().st_mode) for p in finished_run.rglob("*")}
    assert {k for k in modes if "step_" in k} and modes["log.jsonl"] == 0o644
    assert {k: oct(m) for k, m in modes.items() if m != (0o755 if (finished_run / k).is_dir() else 0o644)} == {}
    previous = os.umask(0o027)
    try:
        saved = _save(tmp_path, 1, _net(0))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(saved.directory.stat().st_mode) == 0o750
    assert stat.S_IMODE(saved.directory.parent.stat().st_mode) == 0o750


# -- 5. DDP: a stopped peer times out; SyncBatchNorm where it cannot run ----------------------------------------------
def _stalled_peer(rank: int, port: int, timeout: float, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    distributed.setup_distributed("cpu", timeout=timeout)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a hung rank: alive, never answering
    started = time.monotonic()
    try:
        distributed.barrier()
        results.put((rank, "returned", time.monotonic() - started))
    except RuntimeError as error:
        results.put((rank, str(error).splitlines()[0][:200], time.monotonic() - started))


def _first_result(results, watched, *, deadline: float) -> tuple:
    """The first result put on ``results``; fails at once when ``watched`` died without putting one."""
    ends = time.monotonic() + deadline
    while time.monotonic() < ends:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            if not watched.is_alive() and results.empty():
                pytest.fail(f"rank 0 exited with status {watched.exitcode} before reporting")
    pytest.fail(f"no rank reported within {deadline} s")


def test_a_stopped_peer_fails_within_the_dist_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    peers = [context.Process(target=_stalled_peer, args=(rank, port, 3.0, results)) for rank in range(2)]
    for peer in peers:
        peer.start()
    try:
        rank, outcome, waited = _first_result(results, peers[0], deadline=120)
    finally:
        for peer in peers:
            if peer.pid is not None and peer.is_alive():
                os.kill(peer.pid, signal.SIGKILL)
            peer.join(timeout=30)
    assert rank == 0 and outcome != "returned"
    assert 2.0 <= waited < 30.0, outcome  # the 3 s timeout, not gloo's 30-minute default


def test_the_dist_timeout_reaches_init_process_group(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def init_process_group(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.setup_distributed("cpu", timeout=7.5)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=7.5)

    def stop(device, *, timeout):
        seen["train"] = timeout
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "setup_distributed", stop)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(tmp_path, dist_timeout=42.0))
    assert seen["train"] == 42.0
    assert TrainConfig(output_dir="x", max_steps=1).dist_timeout == 600.0
    with pytest.raises(ValueError, match=r"^dist_timeout must be a finite number > 0\.0, got 0"):
        TrainConfig(output_dir="x", max_steps=1, dist_timeout=0.0).check()


def test_sync_bn_is_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^sync_bn=True needs CUDA") as refused:
        train(_tiny(tmp_path / "run", sync_bn=True, device="cpu"))
    assert refused.value.settings == ("sync_bn=True",)
    assert not (tmp_path / "run").exists()  # refused before anything was written
