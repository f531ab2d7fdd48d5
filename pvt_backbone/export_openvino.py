"""OpenVINO: an ONNX export converted with ``openvino.convert_model``, verified on CPU, saved as ``.xml`` + ``.bin``;
INT8 post-training quantisation with NNCF and its accuracy cost as feature cosine similarity.

The conversion starts from the ONNX file of :func:`pvt_backbone.export.export_onnx` (backbones, classifiers) or
:func:`pvt_backbone.export_models.export_model_onnx` (whole detectors and segmenters), so the graph keeps the ONNX
input/output names and dynamic dimensions. Weights stay fp32 (no fp16 compression). ``.bin`` is written before
``.xml``, each through a temporary file and a rename, so a reader that finds the ``.xml`` finds its weights.

INT8: :func:`quantize_openvino` runs ``nncf.quantize`` (default preset, transformer model type) over calibration
images from :func:`calibration_images` (a folder of images, or the synthetic scenes of
:mod:`pvt_backbone.training.data.synthetic`); :func:`feature_cosine` measures the cost on held-out images as the
mean cosine similarity between the INT8 and fp32 outputs (per image, every output flattened).

Example:
    >>> from pvt_backbone.export import export_onnx
    >>> model = PVTv2Backbone.b0().eval()
    >>> onnx_path = export_onnx(model, torch.rand(1, 3, 64, 64), "b0.onnx")
    >>> result = export_verified_openvino(onnx_path, model, torch.rand(2, 3, 96, 64), "b0.xml")
    >>> result.ok, sorted(p.name for p in Path(".").glob("b0.*"))
    (True, ['b0.bin', 'b0.onnx', 'b0.xml'])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_choice, check_float, check_int
from .export import Verification, _compare, _flatten
from .weights.io import atomic_write

__all__ = [
    "SYNTHETIC",
    "PRECISIONS",
    "openvino_bf16_supported",
    "convert_openvino",
    "compile_openvino",
    "save_openvino",
    "run_openvino",
    "verify_openvino",
    "export_verified_openvino",
    "calibration_images",
    "quantize_openvino",
    "output_cosines",
    "feature_cosine",
]

SYNTHETIC = "synthetic"
PRECISIONS = ("f32", "bf16")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("openvino is needed here: pip install 'pvt-backbone[openvino]'") from error
    return openvino


def convert_openvino(onnx_path: str | os.PathLike[str], *, shape: Sequence[int] | None = None) -> Any:
    """``openvino.convert_model`` of an ONNX file -> ``openvino.Model`` (names and dynamic dimensions kept).

    ``shape`` (e.g. ``(1, 3, 512, 512)``) fixes the input to one static shape: the CPU plugin then plans memory and
    picks kernels for that shape once, which runs faster than the dynamic graph (README, "Runtimes").
    """
    source = Path(onnx_path)
    if not source.is_file():
        raise FileNotFoundError(f"no ONNX file at {source}")
    model = _openvino().convert_model(str(source))
    if shape is not None:
        dims = [int(side) for side in shape]
        if len(dims) != 4 or min(dims) < 1:
            raise ValueError(f"shape must be four positive sizes (B, C, H, W), got {tuple(shape)}")
        model.reshape(dims)
    return model


def compile_openvino(
    model: Any, *, threads: int | None = None, precision: str = "f32", pinning: bool | None = False
) -> Any:
    """Compile an ``openvino.Model`` (or a ``.xml``/``.onnx`` path) for CPU; ``threads`` inference threads.

    ``precision`` is the CPU plugin's inference precision for the layers that are not quantized: ``"f32"`` (the
    exported function within float rounding) or ``"bf16"`` (needs a CPU with bf16 instructions, see
    :func:`openvino_bf16_supported`; outputs move by about 1e-2 relative).

    ``pinning`` sets ``ENABLE_CPU_PINNING``; ``None`` keeps the plugin's default (on, on Linux). Off by default here:
    a pinned thread cannot leave a core another process keeps busy, so with one of two cores busy the pinned model
    ran up to 12x slower than quiet and the unpinned one at most 2x, at the same quiet speed (README, "Runtimes").
    """
    check_choice("precision", precision, PRECISIONS)
    if pinning is not None and not isinstance(pinning, bool):
        raise TypeError(f"pinning must be True, False or None, got {type(pinning).__name__}")
    # explicit even for f32: some CPUs default to bf16 inference, which misses the fp32 tolerance by far
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if pinning is not None:
        config["ENABLE_CPU_PINNING"] = pinning
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    return _openvino().Core().compile_model(source, "CPU", config)


def openvino_bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin reports bf16 execution on this machine (AVX512-BF16 or AMX)."""
    return "BF16" in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def run_openvino(compiled: Any, images: Tensor) -> list[Tensor]:
    """Outputs of a compiled model on (N, C, H, W) float32 ``images``, in the graph's output order."""
    results = compiled(images.detach().to("cpu", torch.float32).contiguous().numpy())
    return [torch.from_numpy(results[output].copy()) for output in compiled.outputs]


def save_openvino(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as ``path`` (``.xml``) and its ``.bin`` beside it (fp32 weights), ``.bin`` first, each
    renamed into place from a temporary file; returns the ``.xml`` path."""
    target = Path(path)
    if target.suffix != ".xml":
        raise ValueError(f"output path must end in '.xml', got {str(target)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}.") as directory:
        staged = Path(directory) / "model.xml"
        _openvino().save_model(model, str(staged), compress_to_fp16=False)
        atomic_write(target.with_suffix(".bin"), lambda temp: shutil.move(str(staged.with_suffix(".bin")), temp))
        atomic_write(target, lambda temp: shutil.move(str(staged), temp))
    return target


def verify_openvino(
    compiled: Any,
    model: nn.Module,
    x: Tensor,
    *,
    atol: float = 1e-4,
    compare: Callable[..., Verification] | None = None,
) -> Verification:
    """Run ``compiled`` and the eager ``model`` on ``x`` and compare every output (``compare(eager_outputs,
    openvino_outputs)`` if given, e.g. a detection comparison)."""
    check_float("atol", atol, minimum=0.0)
    with torch.no_grad():
        expected = _flatten(model(x))
    actual = run_openvino(compiled, x)
    if compare is not None:
        return compare(expected, actual)
    return _compare(expected, actual, tuple(x.shape), atol)


def export_verified_openvino(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    x: Tensor,
    path: str | os.PathLike[str],
    *,
    atol: float = 1e-4,
    compare: Callable[..., Verification] | None = None,
    threads: int | None = None,
) -> Verification:
    """Convert ``onnx_path``, compile it for CPU, check it against the eager ``model`` on ``x`` and save it to
    ``path`` (``.xml`` + ``.bin``) only if the check passes (``result.ok``); returns the check either way."""
    converted = convert_openvino(onnx_path)
    result = verify_openvino(compile_openvino(converted, threads=threads), model, x, atol=atol, compare=compare)
    if result.ok:
        save_openvino(converted, path)
    return result


def _load_folder(directory: Path, count: int, size: tuple[int, int]) -> list[Tensor]:
    from PIL import Image

    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {directory}")
    images = []
    for file in files[:count]:
        with Image.open(file) as image:
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            tensor = array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
        images.append(F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0])
    return images


def calibration_images(
    source: str | os.PathLike[str], count: int, size: Sequence[int], *, split: str = "train"
) -> Tensor:
    """(count, 3, H, W) RGB images in [0, 1] resized to ``size``: from a folder of images (sorted by name; fewer if
    the folder holds fewer), or ``"synthetic"`` scenes of ``split`` ("train" to calibrate, "val" held out)."""
    check_int("count", count, minimum=1)
    height, width = (int(side) for side in size)
    if str(source) == SYNTHETIC:
        from .training.data.synthetic import SyntheticConfig, render_scene

        config = SyntheticConfig(image_size=max(height, width, 32))
        scenes = [render_scene(config, split, index).image for index in range(count)]
        batch = torch.stack([torch.from_numpy(s).permute(2, 0, 1).float() / 255 for s in scenes])
        return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False)
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"calibration source {directory} is neither a folder nor {SYNTHETIC!r}")
    return torch.stack(_load_folder(directory, count, (height, width)))


def quantize_openvino(model: Any, images: Tensor, *, preprocess: Callable[[Tensor], Tensor] | None = None) -> Any:
    """INT8 ``openvino.Model`` from ``nncf.quantize`` calibrated on (N, 3, H, W) ``images`` (one at a time;
    ``preprocess`` maps each to the graph input, e.g. ImageNet normalisation for a backbone)."""
    try:
        import nncf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("nncf is needed for INT8 quantization: pip install 'pvt-backbone[openvino]'") from error
    prepare = preprocess or (lambda x: x)
    dataset = nncf.Dataset([images[i : i + 1] for i in range(images.shape[0])], lambda x: prepare(x).numpy())
    return nncf.quantize(
        model, dataset, subset_size=images.shape[0], model_type=nncf.ModelType.TRANSFORMER, fast_bias_correction=True
    )


def output_cosines(
    reference: Callable[[Tensor], Sequence[Tensor]],
    candidate: Callable[[Tensor], Sequence[Tensor]],
    images: Tensor,
    *,
    batch: int = 1,
) -> list[float]:
    """Per output of ``reference``, the mean over images of the cosine similarity of ``candidate``'s output to it,
    each image's output flattened (e.g. a backbone's four stages: INT8 against fp32). ``images`` (N, 3, H, W) go
    through both ``batch`` at a time (a static-shape model needs its own batch size; N must be a multiple)."""
    check_int("batch", batch, minimum=1)
    if images.shape[0] == 0 or images.shape[0] % batch:
        raise ValueError(f"the number of images ({images.shape[0]}) must be a positive multiple of batch={batch}")
    sums: list[float] = []
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        pairs = list(zip(reference(x), candidate(x), strict=True))
        if not pairs:
            raise ValueError("output_cosines needs models with at least one output")
        sums = sums or [0.0] * len(pairs)
        for index, (want, got) in enumerate(pairs):
            # float64: in float32 the sums over millions of elements round the similarity past 1
            want, got = torch.as_tensor(want).double().flatten(1), torch.as_tensor(got).double().flatten(1)
            sums[index] += F.cosine_similarity(want, got, dim=1).sum().item()
    return [total / images.shape[0] for total in sums]


def feature_cosine(
    reference: Callable[[Tensor], Sequence[Tensor]], candidate: Callable[[Tensor], Sequence[Tensor]], images: Tensor
) -> float:
    """Mean over images and outputs of the cosine similarity of ``candidate``'s outputs to ``reference``'s, each
    output flattened per image (e.g. ``lambda x: run_openvino(int8, x)`` against the fp32 model); the mean of
    :func:`output_cosines`."""
    if images.shape[0] == 0:
        raise ValueError("feature_cosine needs at least one image and one output")
    cosines = output_cosines(reference, candidate, images)
    return sum(cosines) / len(cosines)
