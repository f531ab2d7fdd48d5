"""The benchmark's machinery: case parsing, interleaving, the same-output check, reports and the CLI (never timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cli as benchmark_cli
from benchmarks.harness import BenchmarkSettings, Report, check_same_outputs, run_benchmark, settings_from
from benchmarks.measure import Measurement, PeakMemory, cpu_bf16_kernels, matmul_peak_gflops, time_interleaved
from benchmarks.report import plot_throughput, to_json, to_markdown
from benchmarks.targets import summarize_targets
from pvt_backbone import pvt_v2_b0
from pvt_backbone.cli.arguments import ImageSize, parse_image_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "case"), [("512x512:1", ImageSize(512, 512, 1)), (" 224x96 ", ImageSize(224, 96, 1))])
def test_parse_case(text: str, case: ImageSize) -> None:
    assert parse_image_size(text) == case
    assert str(case) == f"{case.height}x{case.width} b{case.batch}"


@pytest.mark.parametrize(
    ("text", "message"),
    [("512", "HEIGHTxWIDTH"), ("axb:1", "HEIGHTxWIDTH"), ("0x64", "positive"), ("64x64:0", "positive")],
)
def test_parse_case_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_image_size(text)


def test_settings_reject_unknown_values() -> None:
    with pytest.raises(ValueError, match="tasks must be"):
        settings_from(tasks=("inference", "serve"))
    with pytest.raises(ValueError, match="iterations"):
        settings_from(iterations=0)
    with pytest.raises(TypeError):
        settings_from(not_a_field=1)


def test_time_interleaved_alternates_order() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = time_interleaved(steps, iterations=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a-b, b-a, a-b
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}


def test_check_same_outputs_refuses_different_models() -> None:
    torch.manual_seed(0)
    first = pvt_v2_b0(num_classes=5)
    torch.manual_seed(1)
    second = pvt_v2_b0(num_classes=5)
    images = torch.randn(1, 3, 64, 64)
    assert check_same_outputs({"ours": first, "timm": first}, images) == 0.0
    with pytest.raises(AssertionError, match="not timing"):
        check_same_outputs({"ours": first, "timm": second}, images)


def test_peak_memory_sees_an_allocation() -> None:
    if not PeakMemory.supported(torch.device("cpu")):
        pytest.skip("no /proc/self/clear_refs here")
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert block.sum().item() == block.numel()
    assert peak.mib is not None and 60 <= peak.mib < 200


def test_small_run_reports_every_requested_row(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    settings = BenchmarkSettings(
        variant="b0",
        cases=(ImageSize(64, 64, 1), ImageSize(64, 96, 2)),
        train_cases=(ImageSize(64, 64, 1),),
        dtypes=("fp32",),
        iterations=1,
        warmup=0,
        onnx=False,
        detector=False,
        checkpointing_case=ImageSize(64, 64, 1),
    )
    report = run_benchmark(settings, log=lambda line: None)
    rows = {(m.impl, m.task, m.mode, m.case) for m in report.measurements}
    assert rows == {
        *((impl, "inference", "eager", case) for impl in ("ours", "timm") for case in ("64x64 b1", "64x96 b2")),
        *((impl, "train", "eager", "64x64 b1") for impl in ("ours", "timm")),
        ("ours", "train", "no checkpointing", "64x64 b1"),
        ("ours", "train", "checkpointing", "64x64 b1"),
    }
    assert all(m.median_s and m.median_s > 0 for m in report.measurements)
    checkpointed = [m for m in report.measurements if "checkpointing" in m.mode]
    assert all(m.peak_memory_mib and m.peak_memory_mib > 0 for m in checkpointed)
    assert sum("max |ours - timm|" in note for note in report.notes) == 2

    table = to_markdown(report)
    assert "| inference | fp32 | eager | 64x96 b2 |" in table and "| ours (checkpointing) train fp32 |" in table
    payload = json.loads(to_json(report))
    assert len(payload["measurements"]) == len(report.measurements)
    assert payload["machine"]["cores"] >= 1
    targets = summarize_targets(report, cases=("64x64 b1",))
    assert targets[0].startswith("fp32 inference 64x64 b1: ") and "with grad checkpointing" in targets[-1]
    pytest.importorskip("matplotlib")
    written = plot_throughput(report, tmp_path / "plot.png")
    assert written is not None and written.read_bytes().startswith(b"\x89PNG")


def test_markdown_speedup_and_peak_fraction() -> None:
    report = Report(machine={"cpu": "test cpu", "cores": 2}, settings={}, matmul_peak_gflops=100.0)
    for impl, seconds in (("ours", 0.5), ("timm", 1.0)):
        for dtype in ("fp32", "bf16"):
            report.measurements.append(
                Measurement(impl, "b2", "inference", dtype, "eager", "224x224 b2", [seconds, 9.0, seconds], 20.0)
            )
    rows = [line for line in to_markdown(report).splitlines() if line.startswith("| inference")]
    # medians 0.5 s vs 1.0 s: 4 vs 2 img/s at batch 2, 2x; 20 GFLOP / 0.5 s = 40 GFLOP/s, 40% of the fp32 peak only
    assert rows == [
        "| inference | fp32 | eager | 224x224 b2 | 4.00 | 2.00 | 2.00x | 40 (40%) | - / - |  |",
        "| inference | bf16 | eager | 224x224 b2 | 4.00 | 2.00 | 2.00x | 40 | - / - |  |",
    ]
    rows = json.loads(to_json(report))["measurements"]
    fractions = {(m["impl"], m["dtype"]): m["fraction_of_matmul_peak"] for m in rows}
    assert fractions == {
        ("ours", "fp32"): pytest.approx(0.4),
        ("timm", "fp32"): pytest.approx(0.2),
        ("ours", "bf16"): None,
        ("timm", "bf16"): None,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "64"], "HEIGHTxWIDTH"),
        (["--tasks", "serve"], "--tasks must be"),
        (["--iterations", "0"], "--iterations"),
        (["--variant", "b9"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--sizes", "64"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "HEIGHTxWIDTH" in result.stderr and "Traceback" not in result.stderr


def test_device_error_exits_1_with_one_line() -> None:
    """A library error (no CUDA here, or a CUDA device that does not exist) is one line and status 1, not 2."""
    argv = ["--device", "cuda:99", "--no-timm", "--no-onnx", "--no-detector", "--no-checkpointing", "--sizes", "64x64"]
    script = str(ROOT / "tools" / "benchmark.py")
    result = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_peak_runs_in_the_requested_dtype(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []
    real_mm = torch.mm

    def recording_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append((a.dtype, tuple(a.shape)))
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", recording_mm)
    assert matmul_peak_gflops(size=64, repeats=2, dtype=dtype) > 0
    assert seen == [(dtype, (64, 64))] * 3  # one warm-up, then the timed repeats


def test_runtime_rows_are_checked_timed_and_contended(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("timm")
    settings = BenchmarkSettings(
        variant="b0",
        cases=(ImageSize(64, 64, 1),),
        tasks=("inference",),
        dtypes=("fp32",),
        iterations=2,
        warmup=0,
        contended=True,
        detector=False,
        checkpointing=False,
        int8=False,  # INT8 and compiled rows: test_every_runtime_row_computes_the_backbone
        compiled_runtime=False,
    )
    report = run_benchmark(settings, log=lambda line: None)
    rows = {(m.impl, m.dtype, m.mode): m for m in report.measurements}
    assert not any(m.dtype == "int8" for m in report.measurements)
    for impl, mode in (("ours-eager", "eager"), ("ours-onnxruntime", "onnxruntime"), ("ours-openvino", "openvino")):
        quiet, busy = rows[(impl, "fp32", mode)], rows[(impl, "fp32", f"{mode} contended")]
        assert len(quiet.times) == 2 and quiet.median_s and busy.median_s
        assert "x the quiet median" in busy.note
    assert "max abs diff vs eager" in rows[("ours-openvino", "fp32", "openvino")].note
    assert "x timm's contended median" in rows[("ours-eager", "fp32", "eager contended")].note
    assert rows[("timm-features", "fp32", "eager")].note.startswith("max abs diff vs eager")
    assert "| ours-openvino (openvino contended) inference fp32 | 64x64 b1 |" in to_markdown(report)
    if cpu_bf16_kernels():
        note = rows[("ours-eager", "bf16", "eager")].note
        assert 0.99 <= float(note.removeprefix("stage cosine vs eager fp32: min ").split()[0]) <= 1.0
    if importlib.util.find_spec("matplotlib"):
        assert plot_throughput(report, tmp_path / "runtimes.png") is not None


@pytest.mark.isolated  # quantizes (NNCF), like the other INT8 tests
def test_every_runtime_row_computes_the_backbone(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import onnx

    from benchmarks.runtimes import RuntimeSettings, _accuracy_note, runtime_runs, scene_images
    from pvt_backbone import PVTv2Backbone, PVTv2Config
    from pvt_backbone.export import export_onnx

    torch.manual_seed(0)
    model = PVTv2Backbone(PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4)))
    path = export_onnx(model.eval(), torch.rand(1, 3, 64, 64), tmp_path / "tiny.onnx")
    case = ImageSize(64, 64, 2)
    runs = runtime_runs(path, {"eager": model}, case, RuntimeSettings(calibration=4, timm_peer=False, threads=2))
    fp32 = {"compiled", "onnxruntime", "openvino-dynamic", "openvino", "openvino-pinned"}
    assert {f"{name} fp32" for name in fp32} | {"onnxruntime int8", "openvino int8"} <= set(runs)
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in quantized.graph.node) > 10
    images = scene_images(4, case, "val")
    for name, run in runs.items():
        note = _accuracy_note(name, run, runs["eager fp32"], images, case.batch)  # fp32 rows raise beyond 1e-4
        if name.endswith("int8"):
            assert float(note.removeprefix("stage cosine vs eager fp32: min ").split()[0]) > 0.9, (name, note)
        elif name.endswith("fp32") and name != "eager fp32":
            assert note.startswith("max abs diff vs eager"), (name, note)


def test_onnxruntime_calibrates_large_cases_at_a_bounded_area() -> None:
    from benchmarks.runtimes import ORT_CALIBRATION_PIXELS, _onnxruntime_calibration_size

    assert _onnxruntime_calibration_size(ImageSize(224, 224, 8)) == ImageSize(224, 224, 8)
    assert _onnxruntime_calibration_size(ImageSize(512, 512, 1)) == ImageSize(512, 512, 1)
    smaller = _onnxruntime_calibration_size(ImageSize(800, 1333, 1))
    assert smaller == ImageSize(384, 672, 1) and smaller.height * smaller.width <= ORT_CALIBRATION_PIXELS


def test_with_detections_gives_random_detectors_work_for_nms() -> None:
    from benchmarks.detector_runtimes import with_detections
    from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn, retinanet_pvt_v2_fpn

    torch.manual_seed(0)
    image = [torch.rand(3, 96, 96)]
    for build in (retinanet_pvt_v2_fpn, fasterrcnn_pvt_v2_fpn):
        detector = build("b0", num_classes=91, min_size=96, max_size=96).eval()
        with torch.no_grad():
            assert len(detector(image)[0]["boxes"]) == 0  # random weights score below the threshold
            found = with_detections(detector)(image)[0]
        assert len(found["boxes"]) > 1 and set(found["labels"].tolist()) == {1}
    with pytest.raises(TypeError, match="expected a RetinaNet or Faster R-CNN, got Linear"):
        with_detections(torch.nn.Linear(2, 2))


def test_deployment_targets_from_runtime_rows() -> None:
    report = Report(machine={"cpu": "test cpu", "cores": 2}, settings={}, matmul_peak_gflops=100.0)
    rows = [
        ("ours-eager", "fp32", "eager", 0.4),
        ("ours-eager", "fp32", "eager contended", 1.0),
        ("timm-features", "fp32", "eager contended", 1.5),
        ("ours-onnxruntime", "fp32", "onnxruntime", 0.5),
        ("ours-openvino", "fp32", "openvino", 0.2),
        ("ours-openvino-dynamic", "fp32", "openvino-dynamic", 0.8),
        ("ours-compiled", "fp32", "compiled", 0.25),
        ("ours-openvino", "int8", "openvino", 0.25),
        ("ours-onnxruntime", "int8", "onnxruntime", 0.32),
    ]
    for impl, dtype, mode, seconds in rows:
        report.measurements.append(Measurement(impl, "b2", "inference", dtype, mode, "512x512 b1", [seconds]))
    assert summarize_targets(report) == [
        "OpenVINO int8 at 512x512 b1: 1.60x our eager fp32 (target >= 1.5x)",
        "onnxruntime int8 at 512x512 b1: 1.25x our eager fp32 (target >= 1.5x)",
        "our eager fp32 at 512x512 b1: 0.50x the speed of openvino fp32 (target > 1x)",
        "our eager fp32 at 512x512 b1: 2.00x the speed of openvino-dynamic fp32 (target > 1x)",
        "our eager fp32 at 512x512 b1: 1.25x the speed of onnxruntime fp32 (target > 1x)",
        "torch.compile fp32 at 512x512 b1: 0.80x the speed of openvino fp32",
        "one core busy, eager fp32 at 512x512 b1: 1.50x timm (target >= 1.3x)",
    ]
