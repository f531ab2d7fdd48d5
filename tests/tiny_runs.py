"""The tiny training run the engine and fault tests share: Faster R-CNN b0 on 64 px synthetic scenes, CPU-fast."""

from __future__ import annotations

from pathlib import Path

from pvt_backbone.training.tasks import DataSpec
from pvt_backbone.training.trainer import TrainConfig

TINY_OPTIONS = {
    "fpn_channels": 32,
    "box_batch_size_per_image": 16,
    "rpn_post_nms_top_n_train": 32,
    "rpn_batch_size_per_image": 32,
}
TINY_DATA = DataSpec(image_size=64, train_size=8, val_size=2, synthetic_classes=2)


def tiny_run_config(output_dir: Path | str, **overrides: object) -> TrainConfig:
    """Four steps of batch 1, checkpointed every two, no evaluation; ``overrides`` replace any field."""
    settings: dict[str, object] = dict(
        output_dir=str(output_dir),
        model="fasterrcnn",
        variant="b0",
        model_options=TINY_OPTIONS,
        data=TINY_DATA,
        max_steps=4,
        batch_size=1,
        lr=1e-3,
        warmup_steps=1,
        workers=0,
        eval=False,
        log_every=1,
        save_every=2,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
