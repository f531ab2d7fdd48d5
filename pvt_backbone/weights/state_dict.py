"""Comparing a state dict with a model's, and the one strict loader: every key and shape must match."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .layouts import SHOWN, CheckpointError

__all__ = ["StateDictDiff", "compare_state_dicts", "load_state_dict_strict"]


@dataclass(frozen=True)
class StateDictDiff:
    """Differences between a file's tensors (already in the model's key layout) and a model's state dict."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]  # keys present on both sides with a different shape or a non-floating dtype
    detail: dict[str, str]  # key -> "file (..) vs model (..)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def lines(self) -> list[str]:
        """One indented line per kind of difference, the first ``SHOWN`` keys of each and a count."""

        def listed(keys: tuple[str, ...], label: str, with_detail: bool = False) -> list[str]:
            if not keys:
                return []
            shown = [f"{k}: {self.detail[k]}" if with_detail else k for k in keys[:SHOWN]]
            more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
            return [f"  {len(keys)} {label}: " + ", ".join(shown) + more]

        return (
            listed(self.mismatched, "shape/dtype mismatch(es)", with_detail=True)
            + listed(self.missing, "missing key(s) (in the model, not in the file)")
            + listed(self.unexpected, "unexpected key(s) (in the file, not in the model)")
        )


def compare_state_dicts(
    file_sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], ignore: set[str] | frozenset[str] = frozenset()
) -> StateDictDiff:
    """What differs between ``file_sd`` and ``model_sd``; keys in ``ignore`` may be absent from the file.

    Example:
        >>> diff = compare_state_dicts({"w": torch.zeros(2)}, {"w": torch.zeros(3), "b": torch.zeros(1)})
        >>> diff.mismatched, diff.missing, diff.unexpected
        (('w',), ('b',), ())
    """
    detail = {}
    for key, tensor in file_sd.items():
        if key not in model_sd:
            continue
        want = model_sd[key]
        if tensor.shape != want.shape:
            detail[key] = f"file {tuple(tensor.shape)} vs model {tuple(want.shape)}"
        elif want.is_floating_point() and not tensor.is_floating_point():
            detail[key] = f"file dtype {tensor.dtype} vs model {want.dtype}"
    return StateDictDiff(
        missing=tuple(k for k in model_sd if k not in file_sd and k not in ignore),
        unexpected=tuple(k for k in file_sd if k not in model_sd),
        mismatched=tuple(detail),
        detail=detail,
    )


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, hint: str = "") -> None:
    """Load ``state_dict`` into ``model`` only if every key and shape matches; otherwise nothing is loaded.

    Raises:
        CheckpointError: listing the missing, unexpected and mismatched keys, naming ``source``, ending with ``hint``.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> load_state_dict_strict(layer, {"weight": torch.zeros(3, 2)}, source="demo")
        Traceback (most recent call last):
        ...
        pvt_backbone.weights.layouts.CheckpointError: cannot load demo into Linear:
          1 missing key(s) (in the model, not in the file): bias
        Nothing was loaded; the model is unchanged.
    """
    diff = compare_state_dicts(state_dict, model.state_dict())
    if diff:
        lines = [f"cannot load {source} into {type(model).__name__}:", *diff.lines()]
        if hint:
            lines.append(f"  hint: {hint}")
        lines.append("Nothing was loaded; the model is unchanged.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(dict(state_dict), strict=True)
