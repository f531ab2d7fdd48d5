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
  instead of being allocated at full size: a large fresh allocation costs a page fault per 4 KiB page on every call;
* on CPU in fp32 (no autocast), the linear layers and the dense convolutions (spatial reduction, patch embedding of
  stages 2-4) run oneDNN's kernels on weights kept in oneDNN's own layout (:func:`linear`, :func:`conv2d`), with the
  bias added inside the kernel. PyTorch's ``F.linear`` calls MKL, which writes the bias into the output in a pass of
  its own and, on the AMD CPU measured, multiplies more slowly; ``F.conv2d`` re-lays out its weight on every call.
  The reordered weights are made on first use and made again when a weight changes (a new tensor, or an in-place
  write such as ``load_state_dict`` or an optimizer step); they live as long as the weight does. They cost memory
  about the size of those weights (94 MiB for b2), which ``model.set_fast_inference(False)`` avoids.

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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .layers import Block, MlpDWConv, OverlapPatchEmbed, SpatialReductionAttention, to_map, to_tokens

__all__ = ["MLP_CHUNK_ELEMENTS", "applies", "block_forward", "conv2d", "linear", "patch_embed_forward"]

# Upper bound on the elements of one MLP hidden chunk on CPU (8 MiB in fp32): below glibc's 32 MiB ceiling for
# serving allocations with fresh mmap pages, so chunk buffers are reused from the heap without page faults; largely
# cache-resident between fc1, the depthwise conv, GELU and fc2; and few enough chunks that per-op thread
# synchronisation stays negligible, also when other processes compete for the cores. 2^21 beat 2^22 by 1-5% on a
# 2-core AMD EPYC with 16 MiB of L3 (tools/dev/ab_fast_inference.py); 2^19 and below lose to per-op overhead.
MLP_CHUNK_ELEMENTS = 1 << 21

# weight -> (what it was made from, the weight in oneDNN's layout); weak keys, so an entry goes with its weight.
_REORDERED: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def patch_embed_forward(embed: OverlapPatchEmbed, x: Tensor) -> Tensor:
    """``embed(x)`` for a (B, C_in, H, W) map in eval mode without autograd: (B, H', W', C) tokens."""
    if _has_hooks(embed):
        return embed(x)
    return embed.norm(to_tokens(conv2d(embed.proj, x)))


def linear(module: nn.Linear, x: Tensor) -> Tensor:
    """``module(x)`` for (..., C_in) ``x`` in eval mode without autograd; oneDNN's fp32 kernel on CPU where it applies.

    Example:
        >>> layer = nn.Linear(8, 4).eval()
        >>> x = torch.randn(2, 3, 8)
        >>> with torch.inference_mode():
        ...     out = linear(layer, x)
        >>> out.shape, torch.allclose(out, layer(x), atol=1e-6)
        (torch.Size([2, 3, 4]), True)
    """
    if type(module) is not nn.Linear or not _onednn_applies(module, x):
        return module(x)
    weight = _reordered(module.weight, None, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, module.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def conv2d(module: nn.Conv2d, x: Tensor) -> Tensor:
    """``module(x)`` for a (B, C_in, H, W) map in eval mode without autograd; oneDNN's fp32 kernel on CPU for dense
    (``groups=1``) zero-padded convolutions, whose output is channels-last.

    Example:
        >>> conv = nn.Conv2d(8, 16, 3, stride=2, padding=1).eval()
        >>> x = torch.randn(1, 8, 9, 9)
        >>> with torch.inference_mode():
        ...     out = conv2d(conv, x)
        >>> out.shape, torch.allclose(out, conv(x), atol=1e-5)
        (torch.Size([1, 16, 5, 5]), True)
    """
    if (
        type(module) is not nn.Conv2d
        or module.groups != 1
        or module.padding_mode != "zeros"
        or isinstance(module.padding, str)
        or not _onednn_applies(module, x)
    ):
        return module(x)
    x = x.contiguous(memory_format=torch.channels_last)
    padding, stride, dilation = list(module.padding), list(module.stride), list(module.dilation)

    def reorder(weight: Tensor) -> Tensor:
        # oneDNN picks the weight layout for the input's shape; the entry is remade when the shape changes.
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), padding, stride, dilation, 1, list(x.shape)
        )

    weight = _reordered(module.weight, tuple(x.shape), reorder)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, module.bias, padding, stride, dilation, 1, "none", [], "")


def _onednn_applies(module: nn.Linear | nn.Conv2d, x: Tensor) -> bool:
    """Whether ``module`` may run oneDNN's fp32 kernel on ``x``: CPU, fp32 throughout, no autocast, no hooks."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and module.weight.dtype == torch.float32
        and (module.bias is None or module.bias.dtype == torch.float32)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not _has_hooks(module)
    )


def _reordered(weight: Tensor, shape: tuple[int, ...] | None, reorder: Callable[[Tensor], Tensor]) -> Tensor:
    """``reorder(weight)``, cached until ``weight`` is written (its version), moved, or asked for another ``shape``."""
    stamp = (weight.data_ptr(), weight._version, shape)
    entry = _REORDERED.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, reorder(weight.detach()))
        _REORDERED[weight] = entry
    return entry[1]


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
    return _add_into(linear(attn.proj, attn.attend(x, linear=linear, conv2d=conv2d)), residual)


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
        return _add_into(linear(mlp.fc2, _mlp_hidden(mlp, x)), residual)
    if per_image <= MLP_CHUNK_ELEMENTS:
        step = MLP_CHUNK_ELEMENTS // per_image
        for start in range(0, batch, step):
            residual[start : start + step].add_(linear(mlp.fc2, _mlp_hidden(mlp, x[start : start + step])))
        return residual
    for index in range(batch):
        _mlp_rows_into(mlp, x[index], residual[index])
    return residual


def _mlp_hidden(mlp: MlpDWConv, x: Tensor) -> Tensor:
    """fc1 -> [ReLU] -> depthwise conv -> GELU (in place): (B, H, W, C) -> (B, H, W, C_hidden)."""
    x = linear(mlp.fc1, x)
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
        residual[start:stop].add_(linear(mlp.fc2, band))
