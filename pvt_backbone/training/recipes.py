"""Named training recipes: the published PVTv2 detection and segmentation settings (and the CPU demo's) as data.

Each recipe is a JSON file in ``pvt_backbone/training/recipes/`` (installed with the package) of this shape::

    {"name": "retinanet_1x", "description": "...", "source": "where the values come from", "notes": ["..."],
     "total_batch": 16, "train": {<TrainConfig fields>}, "data": {<DataSpec fields>}}

``total_batch`` is the images per optimizer step the recipe's ``lr`` belongs to (processes x ``batch_size``).
:meth:`Recipe.train_config` turns a recipe into a :class:`~pvt_backbone.training.trainer.TrainConfig`: the
``overrides`` replace fields one by one, and when the run's images per step (``world_size`` x ``batch_size``)
differ from ``total_batch`` the LR is scaled by their ratio (the linear scaling rule of Goyal et al., 2017), unless
``lr`` is among the overrides. A ``data`` option this version's ``DataSpec`` does not have is refused by name
(:class:`RecipeError`), never dropped.

Example:
    >>> "retinanet_1x" in list_recipes()
    True
    >>> recipe = load_recipe("retinanet_1x")
    >>> recipe.train["schedule"], recipe.train["milestones"], recipe.total_batch
    ('step', [8, 11], 16)
    >>> config = recipe.train_config("runs/x", world_size=1)  # 1 process x 2 images: 1/8 of the recipe's 16
    >>> config.lr, config.recipe["lr_scale"]
    (1.25e-05, 0.125)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import check_int
from .tasks import DataSpec
from .trainer import TrainConfig

__all__ = ["RECIPE_DIR", "Recipe", "RecipeError", "list_recipes", "load_recipe", "scaled_lr"]

RECIPE_DIR = Path(__file__).with_name("recipes")
# TrainConfig fields a recipe cannot hold: where a run writes and what it resumes belong to the run, not the recipe.
_RUN_FIELDS = ("output_dir", "resume", "data", "recipe")
_REQUIRED = ("total_batch", "train", "data")
_OPTIONAL = ("name", "description", "source", "notes", "scaled_from")


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown name, unreadable file, or a value or option the trainer lacks."""


def scaled_lr(lr: float, *, images_per_step: int, total_batch: int) -> float:
    """``lr`` for ``images_per_step`` images per optimizer step when it was tuned for ``total_batch`` (linear
    scaling: Goyal et al., "Accurate, Large Minibatch SGD", 2017).

    >>> scaled_lr(1e-4, images_per_step=4, total_batch=16)
    2.5e-05
    """
    check_int("images_per_step", images_per_step, minimum=1)
    check_int("total_batch", total_batch, minimum=1)
    return lr if images_per_step == total_batch else lr * images_per_step / total_batch


def _train_fields() -> dict[str, dataclasses.Field]:
    return {spec.name: spec for spec in dataclasses.fields(TrainConfig) if spec.name not in _RUN_FIELDS}


def _field_default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


@dataclass(frozen=True)
class Recipe:
    """One recipe (the module docstring gives the file's shape): ``train`` holds :class:`TrainConfig` fields and
    ``data`` :class:`DataSpec` fields, as JSON values; ``origin`` is the file it came from; ``scaled_from`` records
    the ``lr`` and ``total_batch`` a resolved copy (``pvt-train --print-config``) was scaled from."""

    name: str
    total_batch: int
    train: dict[str, Any]
    data: dict[str, Any]
    description: str = ""
    source: str = ""
    notes: tuple[str, ...] = ()
    scaled_from: dict[str, Any] | None = None
    origin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "notes", tuple(self.notes))
        self.check()

    @property
    def lr(self) -> float:
        """The LR at ``total_batch`` images per step."""
        return self.train.get("lr", _field_default(_train_fields()["lr"]))

    @property
    def batch_size(self) -> int:
        """Images per process and step."""
        return self.train.get("batch_size", _field_default(_train_fields()["batch_size"]))

    def _fail(self, message: str) -> RecipeError:
        where = f" ({self.origin})" if self.origin else ""
        return RecipeError(f"recipe {self.name!r}{where}: {message}")

    def check(self) -> None:
        """Raise :class:`RecipeError` naming the first field the trainer cannot use (``ValueError`` subclass)."""
        try:
            check_int("total_batch", self.total_batch, minimum=1)
        except (ValueError, TypeError) as error:
            raise self._fail(str(error)) from None
        unknown = sorted(set(self.train) - set(_train_fields()))
        if unknown:
            allowed = ", ".join(sorted(_train_fields()))
            raise self._fail(f"train fields {unknown} are not TrainConfig settings a recipe may hold ({allowed})")
        try:
            TrainConfig(output_dir="unused", data=self.data_spec(), **self.train).check()
        except RecipeError:
            raise
        except (ValueError, TypeError) as error:
            raise self._fail(str(error)) from None

    def data_spec(self, overrides: Mapping[str, Any] | None = None) -> DataSpec:
        """The :class:`DataSpec` of ``data`` with ``overrides`` applied; an option it lacks is a :class:`RecipeError`
        naming it (a newer recipe on an older trainer)."""
        values = {**self.data, **(overrides or {})}
        known = {spec.name for spec in dataclasses.fields(DataSpec)}
        unsupported = sorted(set(values) - known)
        if unsupported:
            raise self._fail(
                f"data option{'s' if len(unsupported) > 1 else ''} {', '.join(map(repr, unsupported))} not supported "
                f"by this version's DataSpec (its fields: {', '.join(sorted(known))})"
            )
        try:
            return DataSpec(**values)
        except (ValueError, TypeError) as error:
            raise self._fail(str(error)) from None

    def train_config(
        self, output_dir: str, *, world_size: int = 1, data: Mapping[str, Any] | None = None, **overrides: Any
    ) -> TrainConfig:
        """The run this recipe describes, writing into ``output_dir``, for ``world_size`` processes.

        ``overrides`` replace :class:`TrainConfig` fields (``max_steps`` replaces the recipe's ``epochs`` and the
        other way round), ``data`` replaces :class:`DataSpec` fields. Unless ``lr`` is given, the LR is scaled to
        ``world_size x batch_size`` images per step (:func:`scaled_lr`); ``TrainConfig.recipe`` records it.
        """
        check_int("world_size", world_size, minimum=1)
        unknown = sorted(set(overrides) - set(_train_fields()) - {"output_dir"})
        if unknown:
            raise TypeError(f"unknown TrainConfig fields {unknown}")
        values = {**self.train, **overrides}
        for length, other in (("max_steps", "epochs"), ("epochs", "max_steps")):
            if overrides.get(length) is not None and other not in overrides:
                values[other] = None
        images = world_size * values.get("batch_size", self.batch_size)
        if "lr" not in overrides:
            values["lr"] = scaled_lr(self.lr, images_per_step=images, total_batch=self.total_batch)
        scale = 1.0 if "lr" in overrides else values["lr"] / self.lr
        values["recipe"] = self.record(
            images_per_step=images, lr=values["lr"], scale=scale, overrides=[*overrides, *(data or ())]
        )
        return TrainConfig(output_dir=output_dir, data=self.data_spec(data), **values)

    def record(self, *, images_per_step: int, lr: float, scale: float, overrides: list[str]) -> dict[str, Any]:
        """What ``run.json`` keeps of the recipe: its name, file, source and own values, and how the run departs
        from them (``lr_scale``: the linear-scaling factor applied, 1.0 when ``lr`` was given)."""
        return {
            "name": self.name,
            "origin": self.origin,
            "source": self.source,
            "total_batch": self.total_batch,
            "recipe_lr": self.lr,
            "images_per_step": images_per_step,
            "lr": lr,
            "lr_scale": scale,
            "overrides": sorted(overrides),
            "values": {"train": dict(self.train), "data": dict(self.data)},
        }

    def to_dict(self) -> dict[str, Any]:
        """The file's content (``origin`` is where it was read, not part of it)."""
        data: dict[str, Any] = {"name": self.name, "description": self.description, "source": self.source}
        if self.notes:
            data["notes"] = list(self.notes)
        data.update(total_batch=self.total_batch, train=dict(self.train), data=dict(self.data))
        if self.scaled_from is not None:
            data["scaled_from"] = dict(self.scaled_from)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "", name: str = "") -> Recipe:
        """A recipe from its file's content; ``name`` is used when the content has none."""
        label = f"recipe {data.get('name', name)!r}" + (f" ({origin})" if origin else "")
        if not isinstance(data, Mapping):
            raise RecipeError(f"{label}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        missing = [key for key in _REQUIRED if key not in data]
        if unknown or missing:
            problem = f"unknown keys {unknown}" if unknown else f"missing {', '.join(missing)}"
            raise RecipeError(f"{label}: {problem}; a recipe holds {', '.join(_REQUIRED + _OPTIONAL)}")
        for key in ("train", "data"):
            if not isinstance(data[key], Mapping):
                raise RecipeError(f"{label}: {key} must be a JSON object, got {type(data[key]).__name__}")
        values = {key: data[key] for key in (*_REQUIRED, *_OPTIONAL) if key in data}
        values.update(train=dict(data["train"]), data=dict(data["data"]), name=data.get("name", name))
        return cls(**values, origin=origin)


def list_recipes() -> list[str]:
    """The names of the recipes that come with the package, sorted.

    >>> list_recipes()[:2]
    ['cpu_demo', 'mask_rcnn_1x']
    """
    return sorted(path.stem for path in RECIPE_DIR.glob("*.json"))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: not valid JSON ({error})") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A packaged recipe by name (:func:`list_recipes`), or a JSON file of the same shape by path; checked.

    Raises:
        RecipeError: an unknown name (the message lists the names), invalid JSON, or a value the trainer refuses.
        FileNotFoundError: a path (anything with a ``/`` or ending in ``.json``) that does not exist.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: recipe file not found")
        return Recipe.from_dict(_read(path), origin=str(path), name=path.stem)
    if text not in list_recipes():
        raise RecipeError(f"unknown recipe {text!r}; the recipes are {', '.join(list_recipes())}")
    path = RECIPE_DIR / f"{text}.json"
    return Recipe.from_dict(_read(path), origin=f"pvt_backbone/training/recipes/{path.name}", name=text)
