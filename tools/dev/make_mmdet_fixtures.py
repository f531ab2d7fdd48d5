"""Write the mmdet parity fixtures in tests/fixtures/mmdet/ by running mmdetection's own code (dev only).

Not part of the package and not run by the tests: it needs mmdetection, which the project does not depend on. Build
a scratch environment outside the repository that reuses the project's torch, then run this file with it::

    python3 -m venv /work/scratch/mmdet-venv
    echo /work/main/.venv/lib/python3.11/site-packages \
        > /work/scratch/mmdet-venv/lib/python3.11/site-packages/main_venv.pth
    /work/scratch/mmdet-venv/bin/pip install mmengine mmcv-lite==2.1.0 mmdet==3.3.0
    /work/scratch/mmdet-venv/bin/python tools/dev/make_mmdet_fixtures.py [--out tests/fixtures/mmdet]

mmcv-lite has no compiled ops, so this script registers a stand-in ``mmcv._ext`` whose ``nms`` and
``roi_align_forward`` kernels call ``torchvision.ops.nms`` / ``torchvision.ops.roi_align`` (mmcv's
``RoIAlign(aligned=True, sampling_ratio=0)`` computes exactly ``roi_align(aligned=True, sampling_ratio=0)``); every
other kernel raises if called. mmcv's and mmdet's Python code (batched NMS, anchors, coders, heads) runs unchanged.

It builds mmdet's published PVTv2 RetinaNet and Mask R-CNN (configs/pvt: FPN, heads, anchors and test settings as
published) around a tiny PVTv2 (``embed_dims=8``, heads 1/2/4/4 -> widths 8/16/32/32, one block per stage, FPN width
16) with 5 classes and random, non-degenerate weights, and writes:

* ``retinanet.pth`` / ``maskrcnn.pth``: ``{"meta": {...}, "state_dict": ...}`` as mmdet saves detectors.
* ``inputs.safetensors``: ``image`` (3, 123, 157) uint8 RGB and ``input`` (1, 3, 128, 160), the batch mmdet's
  ``DetDataPreprocessor`` made of it (BGR file order flipped to RGB, normalised, zero-padded to 32), fed to both.
* ``retinanet_outputs.safetensors``: ``cls_score.{l}`` (1, A*K, H_l, W_l) and ``bbox_pred.{l}`` (1, A*4, H_l, W_l)
  logits/deltas per level, final ``det_bboxes`` (N, 4) xyxy, ``det_scores`` (N,), ``det_labels`` (N,) (mmdet's 0..K-1).
* ``maskrcnn_outputs.safetensors``: ``rpn_cls.{l}`` (1, A, H_l, W_l), ``rpn_reg.{l}``
  (1, A*4, H_l, W_l), ``proposals`` (P, 4), ``roi_cls_score`` (P, K+1; background last), ``roi_bbox_pred``
  (P, K*4) for those proposals, final ``det_*``, ``mask_boxes`` (M, 4) and ``mask_logits`` (M, K, 28, 28).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
IMAGE_HW = (123, 157)
NUM_CLASSES = 5
SEED = 0
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def _install_kernels() -> None:
    """Stand-in for mmcv's compiled extension: torchvision kernels for nms and roi_align, errors for the rest."""

    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
        assert offset == 0, "mmdet 3 uses offset 0"
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    def roi_align_forward(
        features,
        rois,
        output,
        argmax_y,
        argmax_x,
        *,
        aligned_height,
        aligned_width,
        spatial_scale,
        sampling_ratio,
        pool_mode,
        aligned,
    ):  # noqa: ANN001
        assert pool_mode == 1, "only average RoIAlign is reproduced"
        output.copy_(
            torchvision.ops.roi_align(
                features, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
            )
        )

    class Ext(types.ModuleType):
        def __getattr__(self, name: str):  # noqa: ANN204
            if name.startswith("__"):
                raise AttributeError(name)

            def missing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                raise NotImplementedError(f"mmcv kernel {name} is not available in mmcv-lite")

            return missing

    ext = Ext("mmcv._ext")
    ext.nms = nms
    ext.roi_align_forward = roi_align_forward
    sys.modules["mmcv._ext"] = ext


def _tiny_backbone() -> dict:
    return dict(
        type="PyramidVisionTransformerV2", embed_dims=8, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 4, 4], init_cfg=None
    )


def _preprocessor() -> dict:
    return dict(type="DetDataPreprocessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=32)


def retinanet_cfg() -> dict:
    """configs/pvt/retinanet_pvtv2-b0_fpn_1x_coco.py (via retinanet_r50_fpn_1x_coco) with a tiny backbone."""
    return dict(
        type="RetinaNet",
        data_preprocessor=_preprocessor(),
        backbone=_tiny_backbone(),
        neck=dict(
            type="FPN",
            in_channels=[8, 16, 32, 32],
            out_channels=16,
            start_level=1,
            add_extra_convs="on_input",
            num_outs=5,
        ),
        bbox_head=dict(
            type="RetinaHead",
            num_classes=NUM_CLASSES,
            in_channels=16,
            stacked_convs=4,
            feat_channels=16,
            anchor_generator=dict(
                type="AnchorGenerator",
                octave_base_scale=4,
                scales_per_octave=3,
                ratios=[0.5, 1.0, 2.0],
                strides=[8, 16, 32, 64, 128],
            ),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        test_cfg=dict(
            nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100
        ),
    )


def maskrcnn_cfg() -> dict:
    """configs/pvt/mask-rcnn_pvtv2-b0_fpn_1x_coco.py test settings (mmdet 3 mask-rcnn_r50_fpn), tiny widths."""
    roi = dict(type="RoIAlign", sampling_ratio=0)
    return dict(
        type="MaskRCNN",
        data_preprocessor=dict(_preprocessor(), pad_mask=True),
        backbone=_tiny_backbone(),
        neck=dict(type="FPN", in_channels=[8, 16, 32, 32], out_channels=16, num_outs=5),
        rpn_head=dict(
            type="RPNHead",
            in_channels=16,
            feat_channels=16,
            anchor_generator=dict(
                type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]
            ),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(
                type="SingleRoIExtractor",
                roi_layer=dict(roi, output_size=7),
                out_channels=16,
                featmap_strides=[4, 8, 16, 32],
            ),
            bbox_head=dict(
                type="Shared2FCBBoxHead",
                in_channels=16,
                fc_out_channels=32,
                roi_feat_size=7,
                num_classes=NUM_CLASSES,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
            mask_roi_extractor=dict(
                type="SingleRoIExtractor",
                roi_layer=dict(roi, output_size=14),
                out_channels=16,
                featmap_strides=[4, 8, 16, 32],
            ),
            mask_head=dict(
                type="FCNMaskHead",
                num_convs=4,
                in_channels=16,
                conv_out_channels=16,
                num_classes=NUM_CLASSES,
                loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
            ),
        ),
        train_cfg=None,
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5),
        ),
    )


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights with unit-scale signals: fan-in normal weights, non-zero biases, jittered LayerNorms."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                fan_in = param[0].numel() if "upsample" not in name else param.shape[0] * param[0, 0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("weight"):  # LayerNorm scales
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _scale_(param: torch.Tensor, factor: float, shift: float = 0.0) -> None:
    with torch.no_grad():
        param.mul_(factor).add_(shift)


def make_image(generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) uint8 RGB: smooth blobs plus noise, so features vary over the image."""
    h, w = IMAGE_HW
    ys = torch.linspace(0, 1, h)[:, None]
    xs = torch.linspace(0, 1, w)[None, :]
    base = torch.stack([torch.sin(6 * xs + 3 * ys), torch.cos(5 * ys - 2 * xs), torch.sin(4 * (xs * ys) + 1)])
    noise = torch.rand((3, h, w), generator=generator)
    return ((base * 0.5 + 0.5) * 180 + noise * 75).clamp(0, 255).to(torch.uint8)


def _preprocess(model, image: torch.Tensor):  # noqa: ANN001, ANN202
    from mmdet.structures import DetDataSample

    h, w = IMAGE_HW
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
    data = model.data_preprocessor({"inputs": [image.flip(0)], "data_samples": [sample]}, False)  # mmdet reads BGR
    return data["inputs"], data["data_samples"]


def _checkpoint(model: torch.nn.Module, arch: str) -> dict:
    import mmdet

    classes = tuple(f"thing{i}" for i in range(NUM_CLASSES))
    meta = {"mmdet_version": mmdet.__version__, "arch": arch, "dataset_meta": {"classes": classes}, "epoch": 12}
    return {"meta": meta, "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}


def run_retinanet(generator: torch.Generator, image: torch.Tensor) -> tuple[dict, dict]:
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    model = MODELS.build(ConfigDict(retinanet_cfg())).eval()
    randomize(model, generator)
    _scale_(model.bbox_head.retina_cls.bias, 1.0, -1.2)  # sigmoid ~0.2: many boxes pass score_thr, none saturate
    _scale_(model.bbox_head.retina_reg.weight, 0.3)
    inputs, samples = _preprocess(model, image)
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        cls_scores, bbox_preds = model.bbox_head(feats)
        result = model.bbox_head.predict_by_feat(
            cls_scores, bbox_preds, batch_img_metas=[samples[0].metainfo], rescale=False
        )[0]
    out = {"input": inputs}
    out |= {f"cls_score.{i}": t for i, t in enumerate(cls_scores)}
    out |= {f"bbox_pred.{i}": t for i, t in enumerate(bbox_preds)}
    out |= {"det_bboxes": result.bboxes, "det_scores": result.scores, "det_labels": result.labels}
    return _checkpoint(model, "retinanet"), out


def run_maskrcnn(generator: torch.Generator, image: torch.Tensor) -> tuple[dict, dict]:
    from mmdet.registry import MODELS
    from mmdet.structures.bbox import bbox2roi
    from mmengine.config import ConfigDict

    model = MODELS.build(ConfigDict(maskrcnn_cfg())).eval()
    randomize(model, generator)
    _scale_(model.rpn_head.rpn_reg.weight, 0.3)
    _scale_(model.roi_head.bbox_head.fc_cls.weight, 0.5)
    _scale_(model.roi_head.bbox_head.fc_reg.weight, 0.5)
    inputs, samples = _preprocess(model, image)
    metas = [samples[0].metainfo]
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        rpn_cls, rpn_reg = model.rpn_head(feats)
        proposals = model.rpn_head.predict_by_feat(
            rpn_cls, rpn_reg, batch_img_metas=metas, cfg=model.test_cfg.rpn, rescale=False
        )
        rois = bbox2roi([p.bboxes for p in proposals])
        roi_out = model.roi_head._bbox_forward(feats, rois)
        result = model.roi_head.predict(feats, proposals, samples, rescale=False)[0]
        mask_boxes = result.bboxes[:8]
        mask_logits = model.roi_head._mask_forward(feats, bbox2roi([mask_boxes]))["mask_preds"]
    out = {"input": inputs}
    out |= {f"rpn_cls.{i}": t for i, t in enumerate(rpn_cls)}
    out |= {f"rpn_reg.{i}": t for i, t in enumerate(rpn_reg)}
    out |= {
        "proposals": proposals[0].bboxes,
        "roi_cls_score": roi_out["cls_score"],
        "roi_bbox_pred": roi_out["bbox_pred"],
    }
    out |= {
        "det_bboxes": result.bboxes,
        "det_scores": result.scores,
        "det_labels": result.labels,
        "mask_boxes": mask_boxes,
        "mask_logits": mask_logits,
    }
    return _checkpoint(model, "maskrcnn"), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "mmdet")
    args = parser.parse_args()
    _install_kernels()
    from mmdet.utils import register_all_modules
    from safetensors.torch import save_file

    register_all_modules()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    image = make_image(generator)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = None
    for name, run in (("retinanet", run_retinanet), ("maskrcnn", run_maskrcnn)):
        checkpoint, outputs = run(generator, image)
        torch.save(checkpoint, args.out / f"{name}.pth")
        tensors = {k: v.detach().contiguous() for k, v in outputs.items()}
        batch = tensors.pop("input")
        assert inputs is None or torch.equal(inputs, batch), "both detectors preprocess the image alike"
        inputs = batch
        save_file(tensors, str(args.out / f"{name}_outputs.safetensors"), metadata={"mmdet": "3.3.0"})
        summary = {k: list(v.shape) for k, v in tensors.items() if k.startswith("det_")}
        labels = torch.bincount(tensors["det_labels"], minlength=NUM_CLASSES).tolist()
        print(
            name,
            json.dumps(summary),
            "scores",
            float(tensors["det_scores"].min()),
            float(tensors["det_scores"].max()),
            "labels",
            labels,
        )
    save_file({"image": image, "input": inputs}, str(args.out / "inputs.safetensors"), metadata={"mmdet": "3.3.0"})


if __name__ == "__main__":
    main()
