"""One process or many: read torchrun's environment, start the process group, pick the device.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them everything runs in one process with no
process group. The backend is NCCL on GPUs and gloo on CPUs.

Example:
    >>> info = setup_distributed("cpu")  # not under torchrun: one process, no process group
    >>> info.rank, info.world_size, info.distributed, info.is_main, info.device
    (0, 1, False, True, device(type='cpu'))
    >>> layer = nn.Linear(2, 2)
    >>> replica_digests(layer, info) == [parameter_digest(layer)]  # one replica: this process's digest
    True
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..checks import check_choice, check_float

__all__ = [
    "DEVICES",
    "DEFAULT_TIMEOUT",
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "barrier",
    "parameter_digest",
    "replica_digests",
]

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for a silent peer (gloo's own default is 30 minutes)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` among ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws progress bars and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(device: str = "auto", *, timeout: float = DEFAULT_TIMEOUT) -> DistInfo:
    """Join torchrun's process group if launched by it; choose the device.

    Args:
        device: ``"auto"`` (the GPU ``LOCAL_RANK`` if CUDA is available, else the CPU), ``"cpu"`` or ``"cuda"``.
        timeout: seconds every collective (and the rendezvous) waits for the other ranks before raising; a hung or
            stopped rank then fails the others instead of keeping them waiting.
    """
    check_choice("device", device, DEVICES)
    check_float("timeout", timeout, minimum=0.0, inclusive=False)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        chosen = torch.device("cuda", torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=chosen if use_cuda else None,
            timeout=datetime.timedelta(seconds=timeout),
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=chosen)


def cleanup_distributed() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter (name, shape, dtype, bytes) in name order: equal digests, equal parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def replica_digests(model: nn.Module, info: DistInfo) -> list[str]:
    """``parameter_digest`` of every rank's replica, in rank order (all ranks must call it)."""
    mine = parameter_digest(model)
    if not info.distributed:
        return [mine]
    gathered: list[str | None] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return [str(d) for d in gathered]
