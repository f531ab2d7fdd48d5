"""The inference path of a PVTv2 block: the same function as ``Block.forward``, with fewer and smaller allocations.

``PVTv2Stage.forward`` is the one place that chooses it (see :func:`applies`): in eval mode with autograd off
(``torch.no_grad`` / ``torch.inference_mode``), in eager mode, unless the model was switched off with
``model.set_fast_inference(False)``. Training and anything that traces the call (``torch.compile``, ``torch.export``,
ONNX, ``torch.jit.trace``) run ``Block.forward``, and so does a block with forward hooks (they would not fire here).
Both agree within float rounding (tests/test_fast_paths.py checks 1e-5 in fp32).

What differs from ``Block.forward``:

* residual adds and the MLP's GELU run in place on temporaries the path owns (never on its input);
* on CPU, once the MLP's hidden activation (``mlp_ratio``, 4-8 times wider than the tokens) would exceed
  ``MLP_CHUNK_ELEMENTS``, the MLP runs on groups of whole images or, for large images, on bands of rows
  (fc1 -> depthwise 3x3 -> GELU -> fc2 on a few rows plus a one-row halo), so the hidden activation stays in cache
  instead of being allocated at full size: a large fresh allocation costs a page fault per 4 KiB page on every call.

Example:
    >>> model = PVTv2Backbone.b0(out_indices=(0,)).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> with torch.no_grad():
    ...     fast = model(x)["0"]
    >>> model.set_fast_inference(False)
    >>> with torch.no_grad():
    ...     plain = model(x)["0"]
    >>> torch.allclose(fast, plain, atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, MlpDWConv, SpatialReductionAttention, to_map, to_tokens

__all__ = ["MLP_CHUNK_ELEMENTS", "applies", "block_forward"]

# Upper bound on the elements of one MLP hidden chunk on CPU (16 MiB in fp32): below glibc's 32 MiB ceiling for
# serving allocations with fresh mmap pages, so chunk buffers are reused from the heap without page faults; largely
# cache-resident between fc1, the depthwise conv, GELU and fc2; and few enough chunks that per-op thread
# synchronisation stays negligible, also when other processes compete for the cores.
MLP_CHUNK_ELEMENTS = 1 << 22


def applies(module: nn.Module) -> bool:
    """Whether ``module`` may run the inference path now: eval mode, autograd off, eager (nothing compiling/tracing)."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return not (module.training or torch.is_grad_enabled())


def block_forward(block: Block, x: Tensor) -> Tensor:
    """``block(x)`` for (B, H, W, C) tokens in eval mode without autograd; never writes ``x``."""
    if _has_hooks(block):
        return block(x)
    x = _attention_residual(block.attn, block.norm1(x), residual=x)  # a new tensor, so the MLP may write into it
    return _mlp_residual(block.mlp, block.norm2(x), residual=x)


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks on ``module`` or on every module: calling its pieces directly would skip them."""
    hooks = nn.modules.module  # torch keeps hook registries as module attributes only
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _add_into(out: Tensor, other: Tensor) -> Tensor:
    """``out + other``, written into ``out`` (a temporary the caller owns) when that keeps the result's dtype."""
    if out.shape == other.shape and torch.result_type(out, other) == out.dtype:
        return out.add_(other)
    return out + other


def _attention_residual(attn: SpatialReductionAttention, x: Tensor, residual: Tensor) -> Tensor:
    """``residual + attn(x)`` as a new tensor (neither input is written)."""
    return _add_into(attn.proj(attn.attend(x)), residual)


def _mlp_residual(mlp: MlpDWConv, x: Tensor, residual: Tensor) -> Tensor:
    """``residual + mlp(x)``; may write the sum into ``residual`` (a temporary of the caller).

    On CPU, once the hidden activation of the batch exceeds ``MLP_CHUNK_ELEMENTS``, the MLP runs on groups of whole
    images, or, for large images, on bands of rows (see ``_mlp_rows_into``).
    """
    batch, height, width, _ = x.shape
    per_image = height * width * mlp.fc1.out_features
    if (
        x.device.type != "cpu"
        or batch * per_image <= MLP_CHUNK_ELEMENTS
        or residual.shape != x.shape
        or torch.is_autocast_enabled("cpu")
    ):
        return _add_into(mlp.fc2(_mlp_hidden(mlp, x)), residual)
    if per_image <= MLP_CHUNK_ELEMENTS:
        step = MLP_CHUNK_ELEMENTS // per_image
        for start in range(0, batch, step):
            residual[start : start + step].add_(mlp.fc2(_mlp_hidden(mlp, x[start : start + step])))
        return residual
    for index in range(batch):
        _mlp_rows_into(mlp, x[index], residual[index])
    return residual


def _mlp_hidden(mlp: MlpDWConv, x: Tensor) -> Tensor:
    """fc1 -> [ReLU] -> depthwise conv -> GELU (in place): (B, H, W, C) -> (B, H, W, C_hidden)."""
    x = mlp.fc1(x)
    if mlp.relu is not None:
        x = x.relu_()
    return torch.ops.aten.gelu_(to_tokens(mlp.dwconv(to_map(x))), approximate=mlp.act.approximate)


def _mlp_rows_into(mlp: MlpDWConv, x: Tensor, residual: Tensor) -> None:
    """``residual += mlp(x)`` for one (H, W, C) image, a band of rows at a time, computing fc1 once per row.

    ``window`` holds fc1's output for the band's rows plus one row above and below (the depthwise conv's halo; zeros
    outside the image, i.e. the conv's padding), so the conv runs without vertical padding and yields exactly the
    band's rows. Moving to the next band keeps the two rows it shares with the previous window.
    """
    height, width, dim = x.shape
    hidden = mlp.fc1.out_features
    rows = max(2, MLP_CHUNK_ELEMENTS // (width * hidden))  # >= 2, so the carried rows never overlap their source
    window = x.new_empty(rows + 2, width, hidden)
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        if start == 0:
            window[0].zero_()
            first = 0  # window row 1 <-> image row 0
        else:
            window[:2].copy_(window[rows : rows + 2])  # image rows start - 1 and start
            first = start + 1
        last = min(stop + 1, height)
        fresh = window[first - start + 1 : last - start + 1]
        torch.addmm(mlp.fc1.bias, x[first:last].reshape(-1, dim), mlp.fc1.weight.t(), out=fresh.view(-1, hidden))
        if mlp.relu is not None:
            fresh.relu_()
        if stop == height:
            window[stop - start + 1].zero_()
        band = to_map(window[None, : stop - start + 2])  # (1, C_h, rows + 2, W), channels-last
        band = F.conv2d(band, mlp.dwconv.weight, mlp.dwconv.bias, padding=(0, 1), groups=hidden)
        band = torch.ops.aten.gelu_(to_tokens(band)[0], approximate=mlp.act.approximate)
        residual[start:stop].add_(mlp.fc2(band))
