"""The training workflow around one run: ``--resume`` with nothing but the run directory, ``--init-from`` a trained
model, a checkpoint on SIGINT/SIGTERM that ``--resume`` continues, ``--threads``, and the line that says what a
weights flag loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvt_backbone.cli import evaluate as evaluate_cli
from pvt_backbone.cli import predict as predict_cli
from pvt_backbone.cli import train as train_cli
from pvt_backbone.cli.common import apply_threads
from pvt_backbone.cli.runner import UsageError, run_command
from pvt_backbone.training import trainer
from pvt_backbone.training.checkpoint import latest_checkpoint
from pvt_backbone.training.inference import load_trained
from pvt_backbone.training.trainer import TrainingInterrupted, read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *"--dataset synthetic --model fasterrcnn --variant b0 --batch-size 1 --lr 1e-3 --warmup-steps 1".split(),
    *"--image-size 64 --train-size 8 --synthetic-classes 2 --workers 0 --no-progress --no-eval --log-every 1".split(),
    *("--model-arg", "fpn_channels=32", "--model-arg", "rpn_post_nms_top_n_train=32"),
    *("--model-arg", "box_batch_size_per_image=16", "--model-arg", "rpn_batch_size_per_image=32"),
]
COMMANDS = {"train": train_cli, "evaluate": evaluate_cli, "predict": predict_cli}


def _run(name: str, argv: list) -> int:
    """The command's exit status, as ``sys.exit(run_command(main))`` would give it (argparse exits by itself)."""
    try:
        return run_command(COMMANDS[name].main, [str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_log(run / "log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A finished one-step run: the model the ``--init-from`` and ``--weights-backbone`` tests start from."""
    output = tmp_path_factory.mktemp("workflow") / "source"
    assert _run("train", [*TINY, "--max-steps", 1, "--output-dir", output]) == 0
    return output


# -- an interrupted run checkpoints the step reached, and --resume alone continues it --------------------------------
def _interrupt(output: Path, number: int) -> subprocess.CompletedProcess:
    """``pvt-train`` in its own process, sent ``number`` once it has logged two steps."""
    command = [sys.executable, "-m", "pvt_backbone.cli.train", *TINY, "--max-steps", "12", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--output-dir", str(output)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (output / "log.jsonl").is_file() and len(_steps(output)) >= 2:
                break
            time.sleep(0.05)
        process.send_signal(number)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_the_step_reached_and_resume_alone_continues(number: int, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    done = _interrupt(output, number)
    assert done.returncode == 128 + number, done.stderr[-2000:]
    checkpoint = latest_checkpoint(output)
    assert checkpoint is not None and 2 <= checkpoint.step < 12  # saved although --save-every 0 and not at the end
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (
        f"train.py: interrupted at step {checkpoint.step}; checkpoint: {checkpoint.directory}; continue with --resume"
    )
    assert "Traceback" not in done.stderr
    assert _steps(output)[-1] == checkpoint.step
    if number == signal.SIGTERM:
        load_trained(output)  # loadable as it is
        return
    # Nothing but the run directory: every setting (length included) comes from its run.json.
    assert _run("train", ["--output-dir", output, "--resume"]) == 0
    assert _steps(output) == list(range(1, 13))
    assert latest_checkpoint(output).step == 12
    assert f"checkpoint: {latest_checkpoint(output).directory} (step 12" in capsys.readouterr().out


@pytest.mark.isolated  # raises SIGTERM in its own process: native state earlier tests leave behind crashed it
def test_the_handlers_come_back_after_training(source_run: Path, tmp_path: Path, monkeypatch) -> None:
    """In one process: a SIGTERM mid-run stops after that step with its checkpoint; the handlers are restored."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    report = trainer._report

    def report_then_signal(run, stats) -> None:
        report(run, stats)
        if run.step == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(trainer, "_report", report_then_signal)
    args = train_cli.build_parser().parse_args([*TINY, "--max-steps", "5", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train(train_cli.config_from_args(args))
    assert (stopped.value.step, stopped.value.checkpoint.step, stopped.value.signal_number) == (2, 2, signal.SIGTERM)
    assert "continue with resume=True" in str(stopped.value)  # the library names the parameter
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- --resume takes the run's settings; typed flags must agree, cadence flags may change -----------------------------
@pytest.fixture()
def half_run(source_run: Path, tmp_path: Path) -> Path:
    """A two-step run whose latest checkpoint is step 1 (the step-2 one removed): a resume has a step to take."""
    output = tmp_path / "half"
    assert _run("train", [*TINY, "--max-steps", 2, "--save-every", 1, "--lr", "5e-4", "--output-dir", output]) == 0
    shutil.rmtree(output / "checkpoints" / "step_00000002")
    (output / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "name": "step_00000001"}))
    return output


def test_resume_refuses_a_typed_flag_that_differs_naming_it(half_run: Path, capsys) -> None:
    # --lr 1e-3 is pvt-train's TINY value but not this run's 5e-4; the default (2e-4) is no flag at all.
    assert _run("train", ["--output-dir", half_run, "--resume", "--lr", "1e-3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: --resume: --lr is 0.001 here but 0.0005 in the run being resumed")
    assert _run("train", ["--output-dir", half_run, "--resume", "--max-steps", "3"]) == 1
    assert "--max-steps is 3 steps here but 2 steps" in capsys.readouterr().err


def test_resume_honours_cadence_flags_and_agreeing_ones(half_run: Path) -> None:
    argv = ["--output-dir", half_run, "--resume", "--log-every", "7", "--lr", "5e-4", "--variant", "b0"]
    assert _run("train", argv) == 0
    record = json.loads((half_run / "run.json").read_text())["train"]
    assert (record["log_every"], record["lr"], record["max_steps"], record["save_every"]) == (7, 5e-4, 2, 1)
    assert _steps(half_run) == [1, 2]


def test_the_length_is_required_without_resume(tmp_path: Path, capsys) -> None:
    assert _run("train", ["--output-dir", tmp_path / "r"]) == 2
    assert "one of the arguments --epochs --max-steps is required" in capsys.readouterr().err


def test_typed_flags_tell_given_from_default() -> None:
    typed = train_cli.typed_flags(["--output-dir", "x", "--resume", "--no-eval", "--dataset", "synthetic"])
    assert typed == {"output_dir", "resume", "no_eval", "dataset"}
    assert train_cli.typed_flags(["--output-dir", "x", "--max-steps", "3"]) == {"output_dir", "max_steps"}


# -- --init-from starts a new run from a whole trained model ---------------------------------------------------------
def test_init_from_a_run_starts_at_step_0_from_its_weights(
    source_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    seen: dict[str, torch.Tensor] = {}
    build_optimizer = trainer._build_optimizer

    def capture(config, model):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return build_optimizer(config, model)

    monkeypatch.setattr(trainer, "_build_optimizer", capture)
    output = tmp_path / "new"
    assert _run("train", [*TINY, "--max-steps", 1, "--init-from", source_run, "--output-dir", output]) == 0
    source = latest_checkpoint(source_run).weights
    expected = load_file(source)
    assert seen.keys() == expected.keys()
    assert all(torch.equal(seen[k], expected[k]) for k in expected)  # the first step starts from the source model
    assert _steps(output) == [1]  # a new run: step 0, not the source's step
    assert json.loads((output / "run.json").read_text())["train"]["init_from"] == str(source_run)
    assert f"init_from: loaded the whole model ({len(expected)} tensors) from {source}" in capsys.readouterr().out
    # Compared on resume like any other setting.
    assert _run("train", ["--output-dir", output, "--resume", "--init-from", source]) == 1
    assert "--init-from is" in capsys.readouterr().err


def test_init_from_is_strict(source_run: Path, tmp_path: Path, capsys) -> None:
    argv = [*TINY, "--max-steps", 1, "--variant", "b1", "--init-from", source_run, "--output-dir", tmp_path / "r"]
    assert _run("train", argv) == 1
    err = capsys.readouterr().err
    assert "cannot load" in err and "model.safetensors" in err and len(err.strip().splitlines()) == 1
    assert latest_checkpoint(tmp_path / "r") is None


def test_weights_backbone_load_is_reported(source_run: Path, tmp_path: Path, capsys) -> None:
    weights = latest_checkpoint(source_run).weights
    argv = [*TINY, "--max-steps", 1, "--weights-backbone", weights, "--output-dir", tmp_path / "r"]
    assert _run("train", argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("weights_backbone: "))
    assert line.startswith("weights_backbone: loaded ") and str(weights) in line


# -- --threads ---------------------------------------------------------------------------------------------------------
def test_threads_sets_torch_and_is_validated(tmp_path: Path, capsys) -> None:
    previous = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(UsageError, match="--threads must be an int >= 1, got 0"):
        apply_threads(0)
    for name, argv in (
        ("train", ["--max-steps", 1, "--output-dir", tmp_path / "r"]),
        ("evaluate", ["--checkpoint", tmp_path]),
        ("predict", ["--checkpoint", tmp_path, "--input", tmp_path, "--output-dir", tmp_path / "p"]),
    ):
        assert _run(name, [*argv, "--threads", "0"]) == 2, name
        assert "--threads must be an int >= 1, got 0" in capsys.readouterr().err
    assert torch.get_num_threads() == previous
