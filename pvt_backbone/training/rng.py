"""Random number generator state: seeding a run, and saving and restoring every rank's generators for exact resume.

States are plain Python values (bytes, ints, lists), so they pickle across ranks and load back with
``torch.load(weights_only=True)``.

Example:
    >>> seed_everything(0)
    >>> state = rng_state()
    >>> first = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(torch.rand(2), first)
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistInfo

__all__ = ["seed_everything", "rng_state", "set_rng_state", "gather_rng_states"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states: ``torch``, ``numpy``, ``python`` and, with CUDA, ``cuda``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only where CUDA is available)."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))


def gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (all ranks must call it)."""
    mine = rng_state()
    if not info.distributed:
        return [mine]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
