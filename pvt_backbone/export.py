"""Deployment: ``torch.export`` programs (``.pt2``) and ONNX models with dynamic batch, height and width, verified.

Both exports trace the autograd path of the model (the eager inference-only kernels are never traced), with every
reshape expressed through tensor-derived sizes, so one file serves every input size it was exported for. Each writer
goes through a temporary file in the target directory and ``os.replace``, so a failed export leaves no partial file;
:func:`save_verified_program` and :func:`export_verified_onnx` also verify that temporary file against the eager model
before the rename, so an export that fails its verification never reaches the target path.

Linear SRA (``b2_li``) pools keys and values adaptively to 7x7. ONNX has no adaptive pooling (the exporter would
lower it to an ``AveragePool`` with the example's fixed windows), so the layer exports that pooling as two averaging
matrix products built from the map's own height and width (:func:`pvt_backbone.layers.adaptive_avg_pool2d_matmul`).
Linear-SRA models therefore export to ``.pt2`` and ONNX like the others: dynamic height and width, exact (to float
rounding) at every size, multiples of 7 or not.

Example:
    >>> model = PVTv2Backbone.b0().eval()
    >>> program = export_program(model, torch.randn(1, 3, 224, 224))
    >>> {k: tuple(v.shape) for k, v in program.module()(torch.randn(2, 3, 256, 320)).items()}
    {'0': (2, 32, 64, 80), '1': (2, 64, 32, 40), '2': (2, 160, 16, 20), '3': (2, 256, 8, 10)}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from .backbone import PVTv2Trunk
from .checks import check_float, check_int
from .weights.io import atomic_write

__all__ = [
    "DEFAULT_MIN_SIZE",
    "Verification",
    "export_program",
    "save_program",
    "load_program",
    "export_onnx",
    "verify_program",
    "verify_onnx",
    "save_verified_program",
    "export_verified_onnx",
    "check_export_sizes",
    "onnxruntime_session",
]

# Smallest height/width a dynamic export accepts (the released variants need >= 29 px; 64 keeps every stage >= 2).
DEFAULT_MIN_SIZE = 64


@dataclass(frozen=True)
class Verification:
    """Outcome of running an export next to the eager model on one input."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def _check_example(model: nn.Module, example: Tensor, name: str = "example") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example, Tensor) or example.dim() != 4:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor, got {shape}")


def _dynamic_shapes(
    example: Tensor, *, dynamic_batch: bool, dynamic_height: bool, dynamic_width: bool, min_size: int
) -> tuple[dict[int, Any], ...]:
    check_int("min_size", min_size, minimum=1)
    for name, dynamic, side in (("height", dynamic_height, 2), ("width", dynamic_width, 3)):
        if dynamic and example.shape[side] < min_size:
            raise ValueError(f"example {name} {example.shape[side]} is below min_size={min_size}")
    dims: dict[int, Any] = {}
    if dynamic_batch:
        dims[0] = Dim.DYNAMIC
    if dynamic_height:
        dims[2] = Dim("height", min=min_size)
    if dynamic_width:
        dims[3] = Dim("width", min=min_size)
    return (dims,)


def _traceable(example: Tensor, dynamic_batch: bool) -> Tensor:
    """torch.export specialises a dimension whose example size is 1, so trace a dynamic batch with two images."""
    return example.repeat(2, 1, 1, 1) if dynamic_batch and example.shape[0] == 1 else example


def _model_min_size(model: nn.Module) -> int:
    """The smallest image side every PVTv2 trunk inside ``model`` accepts (1 when there is none)."""
    return max((m.min_input_size for m in model.modules() if isinstance(m, PVTv2Trunk)), default=1)


def _side_text(x: Tensor) -> str:
    return f"{x.shape[-2]}x{x.shape[-1]}"


def _static_names(dynamic_height: bool, dynamic_width: bool) -> str:
    sides = (("height", dynamic_height), ("width", dynamic_width))
    return " and ".join(f"dynamic_{side}=False" for side, dynamic in sides if not dynamic)


def check_export_sizes(
    model: nn.Module,
    example: Tensor,
    verify_input: Tensor | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
) -> None:
    """Raise ``ValueError`` unless ``model`` exports at ``example``'s (B, C, H, W) size with these dynamic dimensions
    and the export accepts ``verify_input``: both at least the model's ``min_input_size``, a dynamic height/width
    at least ``min_size``, a static one (and a static batch) equal to ``example``'s.

    Example:
        >>> model = PVTv2Backbone.b0().eval()
        >>> check_export_sizes(model, torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 128))
        >>> check_export_sizes(model, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: verify_input 32x32 is below 64x64, the smallest size an export with a dynamic height and width ...
    """
    _check_example(model, example)
    check_int("min_size", min_size, minimum=1)
    smallest = _model_min_size(model)
    if (dynamic_height or dynamic_width) and min_size < smallest:
        raise ValueError(f"min_size={min_size} is below the model's smallest input side, {smallest} px")
    checked = [("example", example)] + ([("verify_input", verify_input)] if verify_input is not None else [])
    for name, x in checked:
        _check_example(model, x, name)
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"{name} {_side_text(x)} is below the model's smallest input, {smallest}x{smallest} "
                f"(min_input_size={smallest})"
            )
    _dynamic_shapes(
        example,
        dynamic_batch=dynamic_batch,
        dynamic_height=dynamic_height,
        dynamic_width=dynamic_width,
        min_size=min_size,
    )
    if verify_input is not None:
        _check_verify_input(example, verify_input, dynamic_batch, dynamic_height, dynamic_width, min_size)


def _check_verify_input(
    example: Tensor, x: Tensor, dynamic_batch: bool, dynamic_height: bool, dynamic_width: bool, min_size: int
) -> None:
    """``x`` against what a program traced at ``example`` with these dynamic dimensions accepts."""
    dynamic = {2: dynamic_height, 3: dynamic_width}
    if any(dynamic[side] and x.shape[side] < min_size for side in (2, 3)):
        raise ValueError(
            f"verify_input {_side_text(x)} is below {min_size}x{min_size}, the smallest size an export with a dynamic "
            f"height and width accepts (min_size={min_size}); verify at that size or larger, or export with "
            "dynamic_height=False and dynamic_width=False at the verify size"
        )
    if any(not dynamic[side] and x.shape[side] != example.shape[side] for side in (2, 3)):
        raise ValueError(
            f"verify_input {_side_text(x)} differs from example {_side_text(example)}: an export with "
            f"{_static_names(dynamic_height, dynamic_width)} accepts that size only"
        )
    if not dynamic_batch and x.shape[0] != example.shape[0]:
        raise ValueError(
            f"verify_input batch {x.shape[0]} differs from example batch {example.shape[0]}: an export with "
            "dynamic_batch=False accepts that batch only"
        )


def export_program(
    model: nn.Module,
    example: Tensor,
    *,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
) -> ExportedProgram:
    """``torch.export`` an image model (backbone, classifier, ...) taking one (B, C, H, W) tensor.

    Args:
        model: put in eval mode by the caller (export records the current mode's behaviour).
        example: an input of the exported kind; its sizes are the ones traced.
        dynamic_batch, dynamic_height, dynamic_width: which input dimensions stay symbolic.
        min_size: smallest height/width the program accepts when those are dynamic.

    Returns:
        The program; ``program.module()(x)`` runs it, :func:`save_program` writes it as ``.pt2``.
    """
    _check_example(model, example)
    shapes = _dynamic_shapes(
        example,
        dynamic_batch=dynamic_batch,
        dynamic_height=dynamic_height,
        dynamic_width=dynamic_width,
        min_size=min_size,
    )
    return torch.export.export(model, (_traceable(example, dynamic_batch),), dynamic_shapes=shapes)


def _write_atomically(path: str | os.PathLike[str], suffix: str, write: Callable[[str], None]) -> Path:
    """``write(temp_name)`` then rename onto ``path`` (which must end in ``suffix``), creating its directory."""
    target = Path(path)
    if target.suffix != suffix:
        raise ValueError(f"output path must end in {suffix!r}, got {str(target)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda temp: write(str(temp)))


def save_program(program: ExportedProgram, path: str | os.PathLike[str]) -> Path:
    """Write ``program`` to ``path`` (``.pt2``) through a temporary file; returns the path."""
    return _write_atomically(path, ".pt2", lambda name: torch.export.save(program, name))


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """Read a ``.pt2`` program written by :func:`save_program`."""
    return torch.export.load(str(path))


def _output_names(model: nn.Module, example: Tensor) -> list[str] | None:
    """``feature_<key>`` for each map of a dict-returning model (keys "0".."3"), ``output`` otherwise."""
    with torch.no_grad():
        outputs = model(example[:1])
    if isinstance(outputs, Mapping):
        return [f"feature_{key}" for key in outputs]
    if isinstance(outputs, Tensor):
        return ["output"]
    return None


def export_onnx(
    model: nn.Module,
    example: Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
    opset_version: int | None = None,
) -> Path:
    """Export to ONNX with torch's dynamo exporter (through ``torch.export``) and write ``path`` (``.onnx``).

    The input is named ``image``; the outputs ``feature_0`` ... ``feature_3`` for a backbone (its dict keys) or
    ``output`` for a classifier. Dynamic dimensions keep their names (``batch``, ``height``, ``width``) in the graph.

    Linear-SRA models (``b2_li``) export like the others, dynamic height and width included (see the module doc).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``example`` is not a 4-D tensor, or a dynamic height/width of it is below ``min_size``.
    """
    options = {"dynamic_batch": dynamic_batch, "dynamic_height": dynamic_height, "dynamic_width": dynamic_width}
    program = _onnx_program(model, example, min_size=min_size, opset_version=opset_version, **options)
    return _write_atomically(path, ".onnx", program.save)


def _onnx_program(
    model: nn.Module,
    example: Tensor,
    *,
    dynamic_batch: bool,
    dynamic_height: bool,
    dynamic_width: bool,
    min_size: int,
    opset_version: int | None,
) -> Any:
    """The ``torch.onnx.ONNXProgram`` of :func:`export_onnx`, not yet written."""
    _check_example(model, example)
    shapes = _dynamic_shapes(
        example,
        dynamic_batch=dynamic_batch,
        dynamic_height=dynamic_height,
        dynamic_width=dynamic_width,
        min_size=min_size,
    )
    options: dict[str, Any] = {"opset_version": opset_version} if opset_version is not None else {}
    onnx_program = torch.onnx.export(
        model,
        (_traceable(example, dynamic_batch),),
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=["image"],
        output_names=_output_names(model, example),
        verbose=False,
        **options,
    )
    if onnx_program is None:  # pragma: no cover - only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    return onnx_program


def _flatten(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        return [value for value in outputs.values()]
    return [value for value in outputs]


def _compare(expected: list[Tensor], actual: list[Tensor], shape: tuple[int, ...], atol: float) -> Verification:
    if len(expected) != len(actual):
        raise ValueError(f"export returned {len(actual)} outputs, eager {len(expected)}")
    worst = 0.0
    for want, got in zip(expected, actual):
        got = torch.as_tensor(got)
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(f"export output shape {tuple(got.shape)} differs from eager {tuple(want.shape)}")
        worst = max(worst, (want.float() - got.float()).abs().max().item())
    return Verification(input_shape=shape, max_abs_diff=worst, atol=atol)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def verify_program(program: ExportedProgram, model: nn.Module, x: Tensor, *, atol: float = 1e-4) -> Verification:
    """Run ``program`` and the eager ``model`` on ``x`` (ideally a size other than the exported one); compare.

    Raises:
        ValueError: ``atol`` is negative or not finite, or the program does not accept ``x``'s shape (a size below
            its ``min_size``, or other than a static size; :func:`check_export_sizes` says which before exporting).
    """
    check_float("atol", atol, minimum=0.0)
    with torch.no_grad():
        expected = _flatten(model(x))
        try:
            actual = _flatten(program.module()(x))
        except (AssertionError, RuntimeError) as error:  # torch.export's input guards raise these
            raise ValueError(
                f"the exported program does not accept x of shape {tuple(x.shape)}: {_first_line(error)}"
            ) from None
    return _compare(expected, actual, tuple(x.shape), atol)


def verify_onnx(
    path: str | os.PathLike[str], model: nn.Module, x: Tensor, *, atol: float = 1e-4, threads: int | None = None
) -> Verification:
    """Run the ONNX file in onnxruntime (CPU) and the eager ``model`` on ``x``; compare every output.

    Raises:
        ValueError: ``atol`` is negative or not finite, or onnxruntime rejects ``x`` (e.g. not the static size).
    """
    check_float("atol", atol, minimum=0.0)
    session = onnxruntime_session(path, threads=threads)
    with torch.no_grad():
        expected = _flatten(model(x))
    try:
        actual = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    except Exception as error:  # onnxruntime's errors are pybind classes outside any public hierarchy
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        raise ValueError(
            f"onnxruntime does not accept x of shape {tuple(x.shape)} for {path}: {_first_line(error)}"
        ) from None
    return _compare(expected, [torch.from_numpy(a) for a in actual], tuple(x.shape), atol)


class _Rejected(Exception):
    """Raised inside the atomic writer so that a failed verification removes the temporary file."""


def _write_verified(
    path: str | os.PathLike[str], suffix: str, write: Callable[[str], None], verify: Callable[[str], Verification]
) -> Verification:
    """``write(temp)``, ``verify(temp)``, and the rename onto ``path`` only when the verification passes."""
    results: list[Verification] = []

    def write_and_verify(name: str) -> None:
        write(name)
        results.append(verify(name))
        if not results[-1].ok:
            raise _Rejected

    try:
        _write_atomically(path, suffix, write_and_verify)
    except _Rejected:
        pass
    return results[-1]


def save_verified_program(
    program: ExportedProgram, path: str | os.PathLike[str], model: nn.Module, x: Tensor, *, atol: float = 1e-4
) -> Verification:
    """Write ``program`` to ``path`` (``.pt2``) only if the written file, loaded back, matches ``model`` on ``x``.

    The file is written under a temporary name beside ``path`` and verified there; when the verification fails
    (``not result.ok``) the temporary file is removed and ``path`` keeps what it held before (nothing, on a first
    export). Returns the verification either way.

    Example:
        >>> model = PVTv2Backbone.b0().eval()
        >>> program = export_program(model, torch.randn(1, 3, 64, 64))
        >>> result = save_verified_program(program, "b0.pt2", model, torch.randn(2, 3, 96, 64))
        >>> result.ok, result.input_shape, Path("b0.pt2").is_file()
        (True, (2, 3, 96, 64), True)
    """
    check_float("atol", atol, minimum=0.0)
    return _write_verified(
        path,
        ".pt2",
        lambda name: torch.export.save(program, name),
        lambda name: verify_program(load_program(name), model, x, atol=atol),
    )


def export_verified_onnx(
    model: nn.Module,
    example: Tensor,
    x: Tensor,
    path: str | os.PathLike[str],
    *,
    atol: float = 1e-4,
    threads: int | None = None,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
    opset_version: int | None = None,
) -> Verification:
    """:func:`export_onnx`, with the file verified in onnxruntime on ``x`` before it is renamed onto ``path``.

    As with :func:`save_verified_program`, a failed verification leaves ``path`` as it was; returns the verification.
    """
    check_float("atol", atol, minimum=0.0)
    options = {"dynamic_batch": dynamic_batch, "dynamic_height": dynamic_height, "dynamic_width": dynamic_width}
    program = _onnx_program(model, example, min_size=min_size, opset_version=opset_version, **options)
    return _write_verified(
        path, ".onnx", program.save, lambda name: verify_onnx(name, model, x, atol=atol, threads=threads)
    )


def onnxruntime_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` with full graph optimisation (``threads`` intra-op threads)."""
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is needed to run ONNX models: pip install onnxruntime") from error
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
