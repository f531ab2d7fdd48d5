"""Run an exported model (``.onnx``, OpenVINO ``.xml``, ``torch.export`` ``.pt2``) like the eager one.

:func:`load_runtime` returns a callable taking a (N, 3, H, W) float32 tensor (the size contract of the export, see
:mod:`pvt_backbone.export_models`) and returning what the eager model returns:

* a backbone export (outputs ``feature_0`` ...): ``{"0": (N, C, H/4, W/4), ...}``;
* a classifier (``output``): the (N, num_classes) logits;
* a whole detector (``boxes``, ``scores``, ``labels``, ``num_detections`` [, ``masks``]): torchvision's list of
  per-image dicts, padding removed, ``masks`` (n, 1, H, W);
* a whole segmenter (``logits``, ``labels``): the (N, num_classes, H, W) logits.

``runtime.raw(images)`` gives the graph's outputs by name instead. The optional libraries (onnxruntime, openvino)
are imported when a model is loaded.

Example:
    >>> from pvt_backbone.export import export_onnx
    >>> path = export_onnx(PVTv2Backbone.b0().eval(), torch.rand(1, 3, 64, 64), "b0.onnx")
    >>> features = load_runtime(path, runtime="onnxruntime")(torch.rand(2, 3, 96, 64))
    >>> {k: tuple(v.shape) for k, v in features.items()}
    {'0': (2, 32, 24, 16), '1': (2, 64, 12, 8), '2': (2, 160, 6, 4), '3': (2, 256, 3, 2)}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checks import check_choice
from .export_models import DETECTION_OUTPUTS, SEGMENTATION_OUTPUTS, padded_to_list

__all__ = ["RUNTIMES", "Runtime", "load_runtime", "structure_outputs"]

RUNTIMES = ("onnxruntime", "openvino", "torch")
_SUFFIXES = {"onnxruntime": (".onnx",), "openvino": (".xml", ".onnx"), "torch": (".pt2",)}


def structure_outputs(named: Mapping[str, Tensor]) -> Any:
    """Graph outputs by name -> the eager model's structure (see the module docstring)."""
    names = list(named)
    if names[: len(DETECTION_OUTPUTS)] == list(DETECTION_OUTPUTS):
        return padded_to_list(list(named.values()))
    if names == list(SEGMENTATION_OUTPUTS):
        return named["logits"]
    if all(name.startswith("feature_") for name in names):
        return {name.removeprefix("feature_"): value for name, value in named.items()}
    if len(names) == 1:
        return next(iter(named.values()))
    return dict(named)


class Runtime:
    """A loaded export: ``runtime(images)`` (eager structure) or ``runtime.raw(images)`` (outputs by name)."""

    def __init__(self, path: Path, runtime: str, run: Callable[[Tensor], dict[str, Tensor]]) -> None:
        self.path = path
        self.runtime = runtime
        self._run = run

    def raw(self, images: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) float32 -> ``{output name: tensor}``."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D (N, C, H, W) tensor, got {shape}")
        return self._run(images.detach().to("cpu", torch.float32).contiguous())

    def __call__(self, images: Tensor) -> Any:
        return structure_outputs(self.raw(images))

    def __repr__(self) -> str:
        return f"Runtime({str(self.path)!r}, runtime={self.runtime!r})"


def _onnxruntime(path: Path, threads: int | None) -> Callable[[Tensor], dict[str, Tensor]]:
    from .export import onnxruntime_session

    session = onnxruntime_session(path, threads=threads)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def run(images: Tensor) -> dict[str, Tensor]:
        outputs = session.run(None, {input_name: images.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}

    return run


def _openvino(path: Path, threads: int | None) -> Callable[[Tensor], dict[str, Tensor]]:
    try:
        import openvino
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("openvino is needed for runtime='openvino': pip install 'pvt-backbone[openvino]'") from error
    # f32: some CPUs default to bf16 inference, which misses the fp32 tolerance by orders of magnitude
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    names = [output.get_any_name() for output in compiled.outputs]
    request = compiled.create_infer_request()

    def run(images: Tensor) -> dict[str, Tensor]:
        results = request.infer([images.numpy()])
        return {name: torch.from_numpy(results[output].copy()) for name, output in zip(names, compiled.outputs)}

    return run


def _torch(path: Path, threads: int | None) -> Callable[[Tensor], dict[str, Tensor]]:
    from . import export_models  # noqa: F401 - registers the NMS operator a whole-model program calls
    from .export import load_program

    module = load_program(path).module()

    def run(images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            outputs = module(images)
        if isinstance(outputs, Tensor):
            return {"output": outputs}
        if isinstance(outputs, Mapping):
            return {f"feature_{key}": value for key, value in outputs.items()}
        names = DETECTION_OUTPUTS + ("masks",) if len(outputs) >= 4 else SEGMENTATION_OUTPUTS
        return dict(zip(names, outputs))

    return run


def load_runtime(path: str | os.PathLike[str], runtime: str = "onnxruntime", *, threads: int | None = None) -> Runtime:
    """Load ``path`` for ``runtime``: ``"onnxruntime"`` (``.onnx``), ``"openvino"`` (``.xml`` or ``.onnx``, CPU) or
    ``"torch"`` (``.pt2``); ``threads`` intra-op threads (default: the runtime's)."""
    check_choice("runtime", runtime, RUNTIMES)
    target = Path(path)
    if target.suffix not in _SUFFIXES[runtime]:
        raise ValueError(f"runtime={runtime!r} loads {' or '.join(_SUFFIXES[runtime])} files, got {str(target)!r}")
    if not target.is_file():
        raise FileNotFoundError(f"no exported model at {target}")
    loaders = {"onnxruntime": _onnxruntime, "openvino": _openvino, "torch": _torch}
    return Runtime(target, runtime, loaders[runtime](target, threads))
