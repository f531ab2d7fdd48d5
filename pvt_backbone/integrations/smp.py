"""PVTv2 encoders for segmentation_models_pytorch (smp 0.6): importing this module registers them.

After ``import pvt_backbone.integrations.smp`` the names ``pvt_v2_b0`` ... ``pvt_v2_b5`` and ``pvt_v2_b2_li`` work
as ``encoder_name`` of the smp decoders in ``SUPPORTED_DECODERS``; the others are refused up front with a
``ValueError`` that says why (``REFUSED_DECODERS``), rather than failing on a shape inside smp.

The encoder follows smp's contract for its own stride-4-first transformer (``mit_b*``): ``forward`` returns
``[image, empty (B, 0, H // 2, W // 2), stage maps at strides 4, 8, 16, 32]`` (NCHW, one map per ``depth`` level
after the first), ``out_channels`` is ``(in_channels, 0, C_0, ...)`` and ``output_stride`` is
``min(32, 2 ** depth)``. Inputs must have sides divisible by ``output_stride`` where the decoder asks for it (smp's
own check; every supported decoder except Unet does) and at least ``min_input_size`` (29 px for standard
spatial-reduction attention).

``encoder_weights`` is ``None`` (random initialisation), a checkpoint path (any layout ``load_weights`` reads),
``"hf-hub:REPO[@REVISION]"``, or a name of ``pvt_backbone.weights.hub`` when that registry is installed; the file is
loaded strictly by ``load_weights``. smp's own names such as ``"imagenet"`` (its default) are refused. smp's
``get_encoder`` passes ``encoder_weights`` only to its Hugging Face names, so this module wraps ``get_encoder`` in the
smp modules that call it: our names go to ``create_encoder``, every other name passes through unchanged.

Example:
    >>> import segmentation_models_pytorch as smp
    >>> import pvt_backbone.integrations.smp
    >>> model = smp.FPN("pvt_v2_b0", encoder_weights=None, classes=3).eval()
    >>> tuple(model(torch.rand(1, 3, 64, 96)).shape)
    (1, 3, 64, 96)
    >>> model.encoder.out_channels
    [3, 0, 32, 64, 160, 256]
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import segmentation_models_pytorch.encoders as smp_encoders
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.encoders._base import EncoderMixin
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from torch import Tensor, nn

from ..backbone import PVTv2Backbone
from ..checks import check_int
from ..config import VARIANTS, PVTv2Config
from ..weights import WeightsSource
from ..weights.io import HUB_PREFIX

__all__ = [
    "ENCODER_NAMES",
    "SUPPORTED_DECODERS",
    "REFUSED_DECODERS",
    "PVTv2Encoder",
    "create_encoder",
    "resolve_encoder_weights",
    "register",
]

ENCODER_NAMES: tuple[str, ...] = tuple(f"pvt_v2_{variant}" for variant in VARIANTS)
"""The smp encoder names this module registers, one per ``VARIANTS`` entry."""

SUPPORTED_DECODERS: tuple[str, ...] = (
    "Unet",
    "UnetPlusPlus",
    "MAnet",
    "Linknet",
    "FPN",
    "PSPNet",
    "PAN",
    "UPerNet",
    "Segformer",
)
"""smp decoders that build, train and round-trip with a PVTv2 encoder.

PAN needs ``encoder_output_stride=32`` (its default 16 asks for dilation) and, as with any encoder at that stride,
inputs of at least 256 px. Linknet skips fusion at the empty stride-2 level and UnetPlusPlus's stride-2 nested
column is zero-width; smp refuses its own ``mit_b*`` names for these two by name only. PSPNet reads the map at
stride ``2 ** encoder_depth`` (default 3: stride 8), FPN needs ``encoder_depth=5``, UPerNet and Segformer at least 3.
"""

_DILATION = (
    "needs encoder_output_stride 8 or 16, i.e. dilated late stages, and PVTv2 encoders run at output stride 32 "
    "only: their stages downsample with patch embeddings and attend through spatial-reduction convs"
)
REFUSED_DECODERS: dict[str, str] = {
    "DeepLabV3": _DILATION,
    "DeepLabV3Plus": _DILATION,
    "DPT": "takes timm ViT encoders ('tu-' names) only; smp itself refuses other encoders",
}
"""smp decoders a PVTv2 encoder cannot serve, with the reason their ``ValueError`` gives."""

_OPTIONS = ("drop_path_rate", "attn_drop_rate", "proj_drop_rate", "frozen_stages", "grad_checkpointing")
_MIN_DEPTH, _MAX_DEPTH = 2, 5  # depth 1 would hold no PVTv2 stage; 5 is the stride-32 map
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")


def _alternatives() -> str:
    return ", ".join(SUPPORTED_DECODERS)


class PVTv2Encoder(PVTv2Backbone, EncoderMixin):
    """A ``PVTv2Backbone`` with smp's encoder interface; parameter names are the backbone's.

    Args:
        config: a ``PVTv2Config`` or a variant name from ``VARIANTS``.
        depth: smp's encoder depth, 2..5: the stride-``2 ** depth`` map is the last one returned; stages after it
            are not built.
        output_stride: must be 32 (see ``make_dilated``).
        in_channels, weights, options: as ``PVTv2Backbone`` (``weights`` is loaded strictly by ``load_weights``).

    Example:
        >>> encoder = PVTv2Encoder("b0", depth=4)
        >>> [tuple(f.shape) for f in encoder(torch.rand(1, 3, 64, 64))]
        [(1, 3, 64, 64), (1, 0, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8), (1, 160, 4, 4)]
        >>> encoder.out_channels, encoder.output_stride
        ([3, 0, 32, 64, 160], 16)
    """

    _is_torch_scriptable = False  # torch.jit.script cannot compile the backbone's fx / fast-inference branches

    def __init__(
        self,
        config: PVTv2Config | str,
        *,
        depth: int = 5,
        output_stride: int = 32,
        in_channels: int = 3,
        weights: WeightsSource | None = None,
        **options: Any,
    ) -> None:
        check_int("depth", depth, minimum=_MIN_DEPTH, maximum=_MAX_DEPTH)
        if output_stride != 32:
            raise ValueError(_dilation_error(output_stride, decoder=None))
        super().__init__(
            config, out_indices=tuple(range(depth - 1)), in_channels=in_channels, weights=weights, **options
        )
        self._depth = depth
        self._in_channels = in_channels
        self._output_stride = 32
        self._out_channels = [in_channels, 0, *self.channels]

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        """(B, C_in, H, W) image -> ``[x, (B, 0, H // 2, W // 2), (B, C_i, H_i, W_i) per built stage]``.

        The empty stride-2 entry stands where a CNN's first map would be, as smp's ``mit_b*`` encoders return it.
        """
        features = self.forward_features(x)
        batch, _, height, width = x.shape
        empty = x.new_empty((batch, 0, height // 2, width // 2))
        return [x, empty, *features.values()]

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        """Modules by the stride of the map they produce (smp's layout; used by ``make_dilated`` only)."""
        groups = self._stage_groups()
        return {4 * 2**index: group for index, group in enumerate(groups)}

    def make_dilated(self, output_stride: int) -> None:
        """Always raises: PVTv2 encoders run at output stride 32 only."""
        raise ValueError(_dilation_error(output_stride, decoder=None))

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Give the patch embedding ``in_channels`` inputs (smp's ``patch_first_conv``: RGB weights cycled when
        ``pretrained``, fresh ones otherwise), keeping ``in_channels`` and ``out_channels[0]`` in step."""
        check_int("in_channels", in_channels, minimum=1)
        if in_channels == self.in_channels:
            return
        patch_first_conv(self, new_in_channels=in_channels, default_in_channels=self.in_channels, pretrained=pretrained)
        self.in_channels = self._in_channels = in_channels
        self._out_channels = [in_channels, *self._out_channels[1:]]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` after dropping a classifier head (``head.*``), as smp's encoders do."""
        kept = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
        return super().load_state_dict(kept, strict=strict, assign=assign)


def _dilation_error(output_stride: int, *, decoder: str | None) -> str:
    who = f"smp.{decoder} " if decoder else ""
    fix = (
        "pass encoder_output_stride=32 (PAN then needs inputs of at least 256 px), or use"
        if decoder == "PAN"
        else "use"
    )
    return (
        f"{who}asks for output_stride={output_stride}, but PVTv2 encoders run at output stride 32 only (their "
        f"stages downsample with patch embeddings and cannot be dilated); {fix} a decoder that takes the stride-32 "
        f"pyramid: {_alternatives()}"
    )


def _check_decoder(name: str, decoder: str | None, *, depth: int, output_stride: int) -> None:
    """Refuse what cannot work with a stride-4-first, undilatable encoder before anything is built."""
    if decoder in REFUSED_DECODERS:
        raise ValueError(
            f"smp.{decoder} cannot use encoder {name!r}: it {REFUSED_DECODERS[decoder]}; decoders that work with "
            f"PVTv2 encoders: {_alternatives()}"
        )
    if output_stride != 32:
        raise ValueError(_dilation_error(output_stride, decoder=decoder))
    if decoder == "FPN" and depth != 5:  # below 5 FPN adds its stride-4 level to the empty stride-2 map
        raise ValueError(f"smp.FPN with encoder {name!r} needs encoder_depth=5, got {depth}")


def _hub() -> Any | None:
    """``pvt_backbone.weights.hub`` when that module is installed, else None."""
    if importlib.util.find_spec("pvt_backbone.weights.hub") is None:
        return None
    return importlib.import_module("pvt_backbone.weights.hub")


def _accepted() -> str:
    names = ", or a published name (pvt_backbone.weights.hub.list_weights())" if _hub() is not None else ""
    return f"None, a checkpoint path, '{HUB_PREFIX}REPO[@REVISION]'{names}"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def resolve_encoder_weights(name: str, weights: object) -> WeightsSource | None:
    """What ``load_weights`` should read for smp's ``encoder_weights`` value (see the module docstring).

    Raises:
        ValueError: smp's own names (``"imagenet"``, ...) or any other string that is neither a path nor a published
            name, naming what is accepted.
        TypeError: not None, a string or a path.
    """
    if weights is None:
        return None
    if isinstance(weights, os.PathLike):
        return Path(weights)
    if not isinstance(weights, str):
        raise TypeError(f"encoder_weights for {name!r} must be {_accepted()}; got {type(weights).__name__}")
    if weights.startswith(HUB_PREFIX) or Path(weights).exists() or _looks_like_path(weights):
        return weights  # a missing file raises FileNotFoundError in the loader, naming the path
    hub = _hub()
    if hub is not None and weights in hub.list_weights():
        return hub.resolve_weights(weights)  # the cached or downloaded file of a published entry
    raise ValueError(
        f"encoder_weights={weights!r} is not available for {name!r} (smp's pretrained names are for its own "
        f"encoders); pass {_accepted()}"
    )


def create_encoder(
    name: str,
    *,
    in_channels: int = 3,
    depth: int = 5,
    weights: object = None,
    output_stride: int = 32,
    decoder: str | None = None,
    **options: Any,
) -> PVTv2Encoder:
    """Build the encoder ``name`` (one of ``ENCODER_NAMES``) as smp's ``get_encoder`` would, for ``decoder``.

    Args:
        name, in_channels, depth, output_stride: ``get_encoder``'s arguments.
        weights: smp's ``encoder_weights`` (see ``resolve_encoder_weights``).
        decoder: the smp model class name asking (``"Unet"``, ...), checked against ``REFUSED_DECODERS``.
        options: backbone options passed through smp's model ``**kwargs``: ``drop_path_rate``, ``attn_drop_rate``,
            ``proj_drop_rate``, ``frozen_stages``, ``grad_checkpointing``.

    Example:
        >>> create_encoder("pvt_v2_b0", decoder="DeepLabV3Plus")
        Traceback (most recent call last):
        ...
        ValueError: smp.DeepLabV3Plus cannot use encoder 'pvt_v2_b0': it needs encoder_output_stride 8 or 16, ...
        >>> create_encoder("pvt_v2_b0", depth=3).out_channels
        [3, 0, 32, 64]
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown PVTv2 encoder {name!r}; expected one of {list(ENCODER_NAMES)}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected encoder options {unknown} for {name!r}; accepted: {list(_OPTIONS)}")
    _check_decoder(name, decoder, depth=depth, output_stride=output_stride)
    source = resolve_encoder_weights(name, weights)
    return PVTv2Encoder(name.removeprefix("pvt_v2_"), depth=depth, in_channels=in_channels, weights=source, **options)


def _calling_decoder() -> str | None:
    """Class name of the smp model whose ``__init__`` is calling ``get_encoder`` (found on the call stack)."""
    frame = sys._getframe(2)  # 0: this function, 1: the get_encoder wrapper, 2: its caller
    for _ in range(3):  # the model's __init__, possibly under smp's config-loading decorator
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if isinstance(caller, SegmentationModel):
            return type(caller).__name__
        frame = frame.f_back
    return None


def _wrap(original: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """smp's ``get_encoder`` with ``ENCODER_NAMES`` routed to ``create_encoder``."""

    @functools.wraps(original)
    def get_encoder(
        name: str,
        in_channels: int = 3,
        depth: int = 5,
        weights: object = None,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> nn.Module:
        if name not in ENCODER_NAMES:
            return original(
                name, in_channels=in_channels, depth=depth, weights=weights, output_stride=output_stride, **kwargs
            )
        return create_encoder(
            name,
            in_channels=in_channels,
            depth=depth,
            weights=weights,
            output_stride=output_stride,
            decoder=_calling_decoder(),
            **kwargs,
        )

    get_encoder.pvt_backbone_wrapper = True  # type: ignore[attr-defined]  # marks it, so register() wraps once
    return get_encoder


def register() -> None:
    """Add ``ENCODER_NAMES`` to smp's encoder table and route them in every loaded smp module's ``get_encoder``.

    Runs on import; calling it again (after importing more smp modules) is harmless.
    """
    for name in ENCODER_NAMES:
        smp_encoders.encoders[name] = {
            "encoder": PVTv2Encoder,
            "pretrained_settings": {},  # weights go through encoder_weights (see the module docstring)
            "params": {"config": name.removeprefix("pvt_v2_")},
        }
    original = smp_encoders.get_encoder
    if getattr(original, "pvt_backbone_wrapper", False):
        original = original.__wrapped__  # type: ignore[attr-defined]
    wrapper = _wrap(original)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(smp.__name__) and getattr(module, "get_encoder", None) in (
            original,
            smp_encoders.get_encoder,
        ):
            module.get_encoder = wrapper  # type: ignore[attr-defined]


register()
