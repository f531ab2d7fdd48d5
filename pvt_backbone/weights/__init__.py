"""PVTv2 weights: key-layout tables, layout detection, reading and loading checkpoints, saving them.

Modules, each depending only on those before it: ``layouts`` (the tables and pure mappings), ``detect`` (layout,
prefix and architecture from a checkpoint's keys and shapes), ``io`` (reading files, the atomic writer),
``state_dict`` (comparing with a model, the strict loader), ``hub`` (published weights by name, downloaded on
demand), ``load``, ``save``, and ``converter`` (inspecting and converting files; it builds a model, so it is not
imported here: ``pvt_backbone.backbone`` imports this package).
"""

from .detect import Architecture, convert, detect_layout, infer_architecture, to_native
from .hub import (
    PUBLISHED,
    PublishedWeights,
    WeightsEnum,
    WeightsLike,
    get_weights,
    list_weights,
    resolve_weights,
)
from .io import Checkpoint, WeightsSource, atomic_write, read_checkpoint
from .layouts import LAYOUTS, CheckpointError, Conversion, DroppedKey, from_native
from .load import LoadReport, LoadWarning, load_model_weights, load_weights
from .save import DTYPES, SaveReport, save_weights
from .state_dict import compare_state_dicts, load_state_dict_strict

__all__ = [
    "LAYOUTS",
    "Architecture",
    "Checkpoint",
    "CheckpointError",
    "Conversion",
    "DTYPES",
    "DroppedKey",
    "LoadReport",
    "LoadWarning",
    "PUBLISHED",
    "PublishedWeights",
    "SaveReport",
    "WeightsEnum",
    "WeightsLike",
    "WeightsSource",
    "atomic_write",
    "compare_state_dicts",
    "convert",
    "detect_layout",
    "from_native",
    "get_weights",
    "infer_architecture",
    "list_weights",
    "load_model_weights",
    "load_state_dict_strict",
    "load_weights",
    "read_checkpoint",
    "resolve_weights",
    "save_weights",
    "to_native",
]
