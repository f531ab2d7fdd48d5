"""Loading and saving weights: every layout and file kind, strictness, peers' numerics, dtypes, channels, heads."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import pvt_backbone.weights.save as save_module
from pvt_backbone import (
    VARIANTS,
    CheckpointError,
    PVTv2,
    PVTv2Backbone,
    PVTv2Config,
    __version__,
    load_weights,
    pvt_v2_b0,
    save_weights,
)
from pvt_backbone.weights import LoadWarning, from_native, read_checkpoint
from pvt_backbone.weights.layouts import LAYOUTS

TINY = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))


def randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere, LayerNorm affine included, so a wrong mapping cannot hide behind the init."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1)
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return model


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, expected: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.fixture
def source() -> dict[str, Tensor]:
    """A native tiny classifier state dict (5 classes) with random values."""
    return snapshot(randomize(PVTv2(TINY, num_classes=5)))


def body(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# ---------------------------------------------------------------------------------------------------------------------
# Numerical parity with peers' code (random weights, no downloads)
# ---------------------------------------------------------------------------------------------------------------------


TIMM_TINY = dict(embed_dims=TINY.embed_dims, depths=TINY.depths, num_heads=TINY.num_heads)  # timm's kwargs


@pytest.mark.parametrize("variant", ["b0", "tiny", "tiny_linear"])
def test_timm_classifier_file_parity(tmp_path: Path, variant: str) -> None:
    timm = pytest.importorskip("timm")
    linear = variant == "tiny_linear"
    kwargs = {} if variant == "b0" else dict(TIMM_TINY, linear=linear)
    reference = randomize(timm.create_model("pvt_v2_b0", num_classes=10, **kwargs)).eval()
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), path)
    if variant == "b0":
        ours = pvt_v2_b0(num_classes=10, weights=path).eval()
    else:
        ours = PVTv2(dataclasses.replace(TINY, linear=linear), num_classes=10, weights=path).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (0, 1)])
def test_timm_features_only_parity(out_indices: tuple[int, ...]) -> None:
    timm = pytest.importorskip("timm")
    reference = timm.create_model("pvt_v2_b0", features_only=True, out_indices=out_indices, **TIMM_TINY)
    reference = randomize(reference).eval()
    state = reference.state_dict()
    assert any(k.startswith("stages_0.") for k in state)  # the timm_features layout
    ours = PVTv2Backbone(TINY, out_indices=out_indices, weights=state).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert list(got) == [str(i) for i in out_indices]
    for index, feature in zip(out_indices, expected):
        torch.testing.assert_close(got[str(index)], feature, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.PvtV2Config(num_labels=10)  # b0 sizes
    model = randomize(transformers.PvtV2ForImageClassification(config)).eval()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return model, directory


def test_hf_save_pretrained_parity(hf_model: tuple[nn.Module, Path]) -> None:
    reference, directory = hf_model
    ours = pvt_v2_b0(num_classes=10, weights=directory / "model.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(pixel_values=x).logits, ours(x)
    # HF uses eps 1e-6 in the patch-embedding and SR norms where the reference uses 1e-5: approximate parity ...
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    # ... and with HF's eps the same weights compute the same function.
    hf_eps = dataclasses.replace(VARIANTS["b0"], embed_norm_eps=1e-6)
    exact = PVTv2(hf_eps, num_classes=10, weights=directory).eval()  # the save_pretrained directory itself
    with torch.no_grad():
        torch.testing.assert_close(exact(x), expected, atol=1e-5, rtol=0)


def test_hf_export_loads_strictly_into_transformers(hf_model: tuple[nn.Module, Path], tmp_path: Path) -> None:
    reference, directory = hf_model
    ours = pvt_v2_b0(num_classes=10, weights=directory)
    report = save_weights(ours, tmp_path / "hf.safetensors", layout="hf")
    assert report.layout == "hf" and report.metadata["format"] == "pt"
    exported = load_file(tmp_path / "hf.safetensors")
    expected = reference.state_dict()
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key


# ---------------------------------------------------------------------------------------------------------------------
# Every layout and file kind through weights=
# ---------------------------------------------------------------------------------------------------------------------


def write_layout(state: dict[str, Tensor], layout: str, directory: Path) -> Path:
    """Write ``state`` (native) as the peers ship it: pvt/mmdet as torch pickles, the others as safetensors."""
    exported = from_native(state, layout).state_dict
    if layout == "pvt":
        path = directory / "pvt_v2_tiny.pth"
        torch.save(exported, path)
    elif layout == "mmdet":  # a detector checkpoint: backbone under 'backbone.', neck and heads beside it
        path = directory / "faster_rcnn_pvt.pth"
        detector = {"backbone." + k: v for k, v in exported.items()}
        detector["neck.fpn_convs.0.conv.weight"] = torch.zeros(4, 4, 3, 3)
        detector["rpn_head.rpn_cls.weight"] = torch.zeros(3, 4, 1, 1)
        torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": detector}, path)
    else:
        path = directory / f"{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in exported.items()}, path)
    return path


@pytest.mark.parametrize("layout", ["timm", "pvt", "hf", "mmdet", "lucid"])
@pytest.mark.filterwarnings("ignore::pvt_backbone.weights.LoadWarning")  # mmdet: neck and heads dropped, reported
def test_every_layout_loads_into_backbone_and_classifier(layout: str, source: dict, tmp_path: Path) -> None:
    path = write_layout(source, layout, tmp_path)
    backbone = PVTv2Backbone(TINY, weights=path)
    assert_same(backbone, body(source))
    has_head = LAYOUTS[layout].head is not None
    classifier = PVTv2(TINY, num_classes=5, weights=path, fresh_head=not has_head)
    if has_head:
        assert_same(classifier, source)
    else:
        state = classifier.state_dict()
        assert all(torch.equal(state[k], v) for k, v in body(source).items())
    report = load_weights(PVTv2Backbone(TINY), path)
    assert report.layout == layout and report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(report.loaded) == set(body(source))
    if layout == "mmdet":
        assert report.prefix == "backbone." and report.container == "['state_dict']"
        dropped = {d.key for d in report.dropped}
        assert {"['meta']", "neck.fpn_convs.0.conv.weight", "rpn_head.rpn_cls.weight"} <= dropped


def test_frozen_stages_survive_loading(source: dict, tmp_path: Path) -> None:
    path = write_layout(source, "timm", tmp_path)
    model = PVTv2Backbone(TINY, frozen_stages=1, weights=path)
    assert not model.patch_embed.proj.weight.requires_grad
    assert model.stages[1].blocks[0].attn.q.weight.requires_grad
    assert torch.equal(model.patch_embed.proj.weight, source["patch_embed.proj.weight"])


def test_classifier_file_into_pruned_backbone_reports_drops(source: dict) -> None:
    model = PVTv2Backbone(TINY, out_indices=(0, 1))
    report = load_weights(model, source)
    assert_same(model, {k: v for k, v in source.items() if k.startswith(("patch_embed.", "stages.0.", "stages.1."))})
    reasons = {d.key: d.reason for d in report.dropped}
    assert "the model has none" in reasons["head.weight"]
    assert "stage 2 is not built" in reasons["stages.2.norm.weight"]
    assert "stage 3 is not built" in reasons["stages.3.blocks.0.attn.kv.weight"]
    assert report.missing == () and report.variant is None  # tiny config: no table variant
    assert "loaded" in report.summary() and "dropped" in report.summary()


def test_num_classes_zero_classifier_drops_the_head(source: dict) -> None:
    model = PVTv2(TINY, num_classes=0)
    report = load_weights(model, source)
    assert {d.key for d in report.dropped} == {"head.weight", "head.bias"}
    assert_same(model, body(source))


# ---------------------------------------------------------------------------------------------------------------------
# Strictness: one error, nothing changed
# ---------------------------------------------------------------------------------------------------------------------


def test_wrong_variant_raises_one_error_and_leaves_the_model_unchanged() -> None:
    with torch.device("meta"):
        b0_shapes = PVTv2Backbone.b0().state_dict()
    b0_file = {k: torch.zeros(v.shape) for k, v in b0_shapes.items()}
    model = PVTv2Backbone(TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, b0_file)
    message = str(info.value)
    assert "holds PVTv2-b0" in message
    assert "shape/dtype mismatch(es): patch_embed.proj.weight: file (32, 3, 7, 7) vs model (8, 3, 7, 7)" in message
    assert "more)" in message and "unexpected key(s)" in message  # b0 has 2 blocks in stage 0, TINY has 1
    assert "PVTv2Backbone.b0()" in message and "the model is unchanged" in message
    assert_same(model, before)


def test_renamed_keys_raise(source: dict) -> None:
    model = PVTv2Backbone(TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="not a PVTv2 checkpoint in any known layout"):
        load_weights(model, {"net." + k.replace(".", "/"): v for k, v in source.items()})
    assert_same(model, before)


def test_missing_tensor_raises_and_strict_false_loads_the_rest(source: dict) -> None:
    partial = body(source)
    del partial["stages.1.blocks.1.mlp.fc2.weight"]
    model = PVTv2Backbone(TINY)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*stages\.1\.blocks\.1\.mlp\.fc2\.weight"):
        load_weights(model, partial)
    assert_same(model, before)
    partial["stages.0.blocks.0.attn.q.weight"] = torch.zeros(3, 3)  # and one wrong shape
    with pytest.warns(LoadWarning, match="strict=False left keys unloaded"):
        report = load_weights(model, partial, strict=False)
    assert report.missing == ("stages.1.blocks.1.mlp.fc2.weight",)
    assert report.mismatched == ("stages.0.blocks.0.attn.q.weight",)
    state = model.state_dict()
    assert torch.equal(state["stages.1.blocks.1.mlp.fc2.weight"], before["stages.1.blocks.1.mlp.fc2.weight"])
    assert torch.equal(state["stages.0.blocks.0.attn.q.weight"], before["stages.0.blocks.0.attn.q.weight"])
    assert torch.equal(state["stages.3.norm.bias"], source["stages.3.norm.bias"])


def test_pvt_v1_and_mit_are_rejected_with_helpful_messages() -> None:
    v1 = {
        "pos_embed1": torch.zeros(1, 16, 8),
        "cls_token": torch.zeros(1, 1, 32),
        "patch_embed1.proj.weight": torch.zeros(8, 3, 4, 4),
    }
    with pytest.raises(CheckpointError, match="PVT v1 checkpoint, not PVTv2"):
        load_weights(PVTv2Backbone(TINY), v1)
    mit_config = PVTv2Config(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), mlp_ratios=(4, 4, 4, 4))
    with torch.device("meta"):
        mit = from_native(PVTv2Backbone(mit_config).state_dict(), "pvt").state_dict
        model = PVTv2Backbone.b2()
    with pytest.raises(CheckpointError) as info:
        load_weights(model, mit)
    message = str(info.value)
    assert "SegFormer MiT-b2, not a PVTv2 variant" in message and "MLP ratio 4 in every stage" in message
    assert "mlp.fc1.weight: file (256, 64) vs model (512, 64)" in message


def test_head_class_count_mismatch_needs_fresh_head(source: dict) -> None:
    model = PVTv2(TINY, num_classes=7)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="head has 5 classes, the model's 7.*num_classes=5.*fresh_head=True"):
        load_weights(model, source)
    assert_same(model, before)
    report = load_weights(model, source, fresh_head=True)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert any("freshly initialised (7 classes)" in note for note in report.notes)
    state = model.state_dict()
    assert torch.equal(state["head.weight"], before["head.weight"])
    assert all(torch.equal(state[k], v) for k, v in body(source).items())


def test_backbone_file_into_classifier_needs_fresh_head(source: dict) -> None:
    model = PVTv2(TINY, num_classes=5)
    with pytest.raises(CheckpointError, match="no classifier head.*fresh_head=True"):
        load_weights(model, body(source))
    load_weights(model, body(source), fresh_head=True)
    assert torch.equal(model.state_dict()["stages.3.norm.weight"], source["stages.3.norm.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# Files: pickles, corruption, dtypes, channels
# ---------------------------------------------------------------------------------------------------------------------


def test_pickle_needing_code_is_refused_unless_trusted(source: dict, tmp_path: Path) -> None:
    path = tmp_path / "train_ckpt.pth"
    torch.save({"model": source, "args": argparse.Namespace(lr=0.1), "epoch": 300}, path)
    model = PVTv2(TINY, num_classes=5)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert "argparse.Namespace" in message and "trust_pickle=True" in message
    assert "--trust-pickle" not in message  # the library names its parameter; the command line words it as a flag
    assert_same(model, before)
    report = load_weights(model, path, trust_pickle=True)
    assert_same(model, source)
    assert {"['args']", "['epoch']"} <= {d.key for d in report.dropped}


@pytest.mark.parametrize(
    "kind", ["truncated safetensors", "truncated pth", "garbage pth", "garbage safetensors", "empty"]
)
def test_truncated_and_corrupt_files(kind: str, source: dict, tmp_path: Path) -> None:
    if "safetensors" in kind:
        path = tmp_path / "w.safetensors"
        save_file(source, path)
    else:
        path = tmp_path / "w.pth"
        torch.save(source, path)
    data = path.read_bytes()
    if kind.startswith("truncated"):
        path.write_bytes(data[: len(data) // 2])
    elif kind.startswith("garbage"):
        path.write_bytes(b"\x00\x01garbage" * 64)
    else:
        path.write_bytes(b"")
    model = PVTv2(TINY, num_classes=5)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=f"cannot read {path}.*(truncated or corrupt|corrupt)"):
        load_weights(model, path)
    assert_same(model, before)


def test_missing_files_and_odd_contents(source: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(PVTv2Backbone(TINY), tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_weights(PVTv2Backbone(TINY), tmp_path)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_weights(PVTv2Backbone(TINY), tmp_path / "tensor.pt")
    with pytest.raises(TypeError, match="weights must be a path"):
        load_weights(PVTv2Backbone(TINY), 42)  # type: ignore[arg-type]
    save_file(source, tmp_path / "weights.bin.part")  # unknown suffix: sniffed as safetensors
    assert read_checkpoint(tmp_path / "weights.bin.part").content.keys() == source.keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "mixed"])
def test_half_precision_files_load_into_fp32(dtype: torch.dtype | str, source: dict, tmp_path: Path) -> None:
    if dtype == "mixed":
        stored = {k: v.to(torch.bfloat16) if i % 2 else v for i, (k, v) in enumerate(source.items())}
    else:
        stored = {k: v.to(dtype) for k, v in source.items()}
    save_file(stored, tmp_path / "half.safetensors")
    model = PVTv2(TINY, num_classes=5)
    report = load_weights(model, tmp_path / "half.safetensors")
    assert model.stages[0].norm.weight.dtype == torch.float32
    assert_same(model, {k: v.float() for k, v in stored.items()})
    assert any(note.startswith("cast ") and "-> float32" in note for note in report.notes)


def test_integer_tensor_is_a_dtype_mismatch(source: dict) -> None:
    bad = dict(body(source))
    bad["stages.0.norm.bias"] = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(CheckpointError, match="stages.0.norm.bias: file dtype torch.int64 vs model torch.float32"):
        load_weights(PVTv2Backbone(TINY), bad)


@pytest.mark.parametrize("channels", [1, 2, 4, 6])
def test_in_channels_adapts_the_first_conv(channels: int, source: dict, caplog: pytest.LogCaptureFixture) -> None:
    rgb = source["patch_embed.proj.weight"]
    with caplog.at_level(logging.INFO, logger="pvt_backbone.weights"):
        model = PVTv2Backbone(TINY, in_channels=channels, weights=source)
    weight = model.patch_embed.proj.weight.detach()
    assert weight.shape == (8, channels, 7, 7)
    if channels == 1:
        torch.testing.assert_close(weight, rgb.sum(dim=1, keepdim=True))
    else:
        for c in range(channels):
            torch.testing.assert_close(weight[:, c], rgb[:, c % 3] * 3 / channels)
    assert f"adapted patch_embed.proj.weight from 3 to {channels} input channels" in caplog.text
    assert torch.equal(model.stages[2].norm.weight.detach(), source["stages.2.norm.weight"])
    model(torch.randn(1, channels, 64, 64))


def test_non_rgb_file_is_not_adapted(source: dict) -> None:
    four = PVTv2Backbone(TINY, in_channels=4)
    randomize(four)
    four_state = snapshot(four)
    assert_same(PVTv2Backbone(TINY, in_channels=4, weights=four_state), four_state)
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight: file \(8, 4, 7, 7\) vs model \(8, 1, 7, 7\)"):
        PVTv2Backbone(TINY, in_channels=1, weights=four_state)


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_every_layout_and_load_it_back(layout: str, source: dict, tmp_path: Path) -> None:
    model = PVTv2(TINY, num_classes=5)
    load_weights(model, source)
    origin = tmp_path / "origin.pth"
    torch.save(source, origin)
    path = tmp_path / f"out_{layout}.safetensors"
    report = save_weights(model, path, layout=layout, source=origin)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == set(from_native(source, layout).state_dict)
    assert metadata["pvt_backbone.layout"] == layout
    assert metadata["pvt_backbone.variant"] == "unknown"  # TINY is no table variant
    assert metadata["pvt_backbone.source"] == "origin.pth"
    assert metadata["pvt_backbone.source_sha256"] == hashlib.sha256(origin.read_bytes()).hexdigest()
    assert metadata["pvt_backbone.version"] == __version__
    assert metadata["pvt_backbone.dtype"] == "float32"
    assert report.num_tensors == len(from_native(source, layout).state_dict)
    reloaded = PVTv2(TINY, num_classes=5, fresh_head=LAYOUTS[layout].head is None, weights=path)
    state = reloaded.state_dict()
    expected = source if LAYOUTS[layout].head is not None else body(source)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_save_records_variant_and_load_report_provenance(tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = PVTv2Backbone.b0(out_indices=(0, 1, 2, 3)).state_dict()
    b0 = {k: torch.randn(v.shape) for k, v in shapes.items()}
    save_file(b0, tmp_path / "b0.safetensors")
    model = PVTv2Backbone.b0()
    report = load_weights(model, tmp_path / "b0.safetensors")
    assert report.variant == "b0"
    saved = save_weights(model, tmp_path / "again.safetensors", dtype="bfloat16", source=report)
    assert saved.variant == "b0"
    reread = read_checkpoint(tmp_path / "again.safetensors")
    assert reread.metadata["pvt_backbone.variant"] == "b0"
    assert reread.metadata["pvt_backbone.source"] == "b0.safetensors"
    assert reread.metadata["pvt_backbone.source_sha256"] == report.sha256
    assert reread.metadata["pvt_backbone.dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in reread.content.values())


def test_save_handles_aliased_and_non_contiguous_tensors(tmp_path: Path, source: dict) -> None:
    state = dict(source)
    state["stages.0.norm.bias"] = state["stages.0.norm.weight"]  # two keys, one storage
    state["stages.1.blocks.0.attn.q.weight"] = state["stages.1.blocks.0.attn.q.weight"].t().contiguous().t()
    assert not state["stages.1.blocks.0.attn.q.weight"].is_contiguous()
    save_weights(state, tmp_path / "ok.safetensors", source=source)  # a state dict as the source: named, no hash
    with safe_open(tmp_path / "ok.safetensors", "pt") as handle:
        assert handle.metadata()["pvt_backbone.source"] == "<state dict>"
        assert "pvt_backbone.source_sha256" not in handle.metadata()
    reread = load_file(tmp_path / "ok.safetensors")
    assert torch.equal(reread["stages.0.norm.bias"], source["stages.0.norm.weight"])
    assert torch.equal(reread["stages.1.blocks.0.attn.q.weight"], source["stages.1.blocks.0.attn.q.weight"])


def test_written_variant_is_the_given_one_where_shapes_fit_several(tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = PVTv2Backbone.b3(out_indices=(0, 1)).state_dict()  # stages 0-1 of b2 and b3 are shape-identical
    pruned = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    inferred = save_module.write_safetensors(pruned, tmp_path / "a.safetensors", layout="timm")
    given = save_module.write_safetensors(pruned, tmp_path / "b.safetensors", layout="timm", variant="b3")
    assert (inferred.variant, inferred.metadata["pvt_backbone.variant"]) == (None, "unknown")
    assert read_checkpoint(tmp_path / "b.safetensors").metadata["pvt_backbone.variant"] == given.variant == "b3"


def test_failed_save_keeps_the_existing_file(tmp_path: Path, source: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous contents")

    def broken_save(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(source, path)
    assert path.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_save_errors(tmp_path: Path, source: dict) -> None:
    with pytest.raises(ValueError, match="must end with .safetensors"):
        save_weights(source, tmp_path / "out.pth")
    with pytest.raises(FileNotFoundError, match="output directory"):
        save_weights(source, tmp_path / "missing" / "out.safetensors")
    with torch.device("meta"):
        meta_model = PVTv2Backbone(TINY)
    with pytest.raises(ValueError, match="meta device"):
        save_weights(meta_model, tmp_path / "meta.safetensors")
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        save_weights(source, tmp_path / "x.safetensors", layout="onnx")
    report = save_weights(source, tmp_path / "mm.safetensors", layout="mmdet")
    assert {d.key for d in report.dropped} == {"head.weight", "head.bias"}


# ---------------------------------------------------------------------------------------------------------------------
# Optional hub source, offline against a locally built cache
# ---------------------------------------------------------------------------------------------------------------------


def test_hf_hub_source_from_a_local_cache(source: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--timm--pvt_v2_tiny.in1k"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(source, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may touch the network
    model = PVTv2(TINY, num_classes=5, weights="hf-hub:timm/pvt_v2_tiny.in1k")
    assert_same(model, source)
    with pytest.raises(CheckpointError, match="cannot get model.safetensors of 'hf-hub:timm/absent'"):
        load_weights(model, "hf-hub:timm/absent")
    with pytest.raises(CheckpointError, match="expected 'hf-hub:ORG/NAME"):
        load_weights(model, "hf-hub:no-slash")
