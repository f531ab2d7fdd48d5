"""Published weights: the table against our models, enum access, transforms, and resolution (cache, hashes, offline).

Nothing is downloaded: ``torch.hub.download_url_to_file`` is replaced, or entries point at ``file://`` URLs in
``tmp_path``, and ``TORCH_HOME`` is ``tmp_path``.
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import Tensor

import pvt_backbone
import pvt_backbone.weights.hub as hub
from pvt_backbone import CheckpointError, PVTv2, PVTv2Backbone, PVTv2Config, load_weights, save_weights
from pvt_backbone.flops import count_macs
from pvt_backbone.registry import MODELS
from pvt_backbone.weights.hub import (
    PUBLISHED,
    WEIGHTS_ENUMS,
    PublishedWeights,
    PVTv2_B0_Weights,
    PVTv2_B2_Li_Weights,
    RetinaNet_PVTv2_B0_FPN_Weights,
    get_weights,
    list_weights,
    resolve_source,
    resolve_weights,
)
from pvt_backbone.weights.io import file_sha256
from pvt_backbone.weights.layouts import LAYOUTS

CLASSIFIERS = sorted({e.builder for e in PUBLISHED.values() if e.task == "classification"})
SHALLOW = ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li")  # MACs counted in < 1 s each
DOWNLOAD = torch.hub.download_url_to_file
TINY = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The torch hub cache lives in ``tmp_path/hub``; nothing but ``file://`` URLs may be fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        if not url.startswith("file://"):
            pytest.fail(f"unexpected download of {url}")  # a BaseException: no ``except Exception`` hides it
        DOWNLOAD(url, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(hub, "_hf_download", lambda repo, name: no_network(repo, name))
    return tmp_path


def serve(monkeypatch: pytest.MonkeyPatch, payload: Path) -> list[str]:
    """Make ``download_url_to_file`` copy ``payload``; returns the list of URLs asked for."""
    asked: list[str] = []

    def fake(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        asked.append(url)
        shutil.copyfile(payload, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    return asked


def checkpoints(torch_home: Path) -> list[str]:
    folder = torch_home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, dict[str, Tensor]]:
    """A tiny classifier in the authors' key layout (what their release holds), with its native state dict; the
    entries' files are stood in for by it, and models of the same tiny config load it."""
    model = PVTv2(TINY, num_classes=3)
    path = tmp_path / "served" / "tiny.safetensors"
    path.parent.mkdir()
    save_weights(model, path, layout="pvt")
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def local_entry(path: Path, **changes: object) -> PublishedWeights:
    """A copy of the b0 entry, its file served from ``path`` by a ``file://`` URL."""
    return dataclasses.replace(PUBLISHED["pvt_v2_b0.in1k"], name="local.b0", url=path.as_uri(), **changes)


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", CLASSIFIERS)
def test_parameters_and_macs_match_our_models(builder: str) -> None:
    build = getattr(pvt_backbone, builder)
    with torch.device("meta"):
        params = sum(p.numel() for p in build().parameters())
    macs = count_macs(build, 224, 224) if builder in SHALLOW else None  # b3-b5: deep, seconds each on 2 cores
    for name in list_weights(builder):
        entry = get_weights(name)
        assert entry.num_params == params, name
        assert entry.gmacs is not None and (macs is None or abs(entry.gmacs - macs / 1e9) < 5e-4), (name, macs)


def test_every_entry_is_well_formed_and_in_one_enum_class() -> None:
    for name, entry in PUBLISHED.items():
        assert entry.name == name and entry.builder in MODELS and entry.layout in LAYOUTS
        assert entry.license == "apache-2.0" and entry.metrics and entry.page.startswith("https://")
        assert entry.download_url.startswith("https://")
        members = [m for m in WEIGHTS_ENUMS[entry.builder] if m.value is entry]
        assert len(members) == 1, name
    for builder, enum in WEIGHTS_ENUMS.items():
        assert enum.DEFAULT.value.builder == builder
        assert {m.value.name for m in enum} == set(list_weights(builder))


def test_mmdet_hashes_are_the_file_name_suffix() -> None:
    detectors = [e for e in PUBLISHED.values() if e.task == "detection"]
    assert len(detectors) == 6
    for entry in detectors:
        assert entry.sha256 is not None and len(entry.sha256) == 8
        assert entry.url is not None and entry.url.endswith(f"-{entry.sha256}.pth")
        assert entry.url.startswith("https://download.openmmlab.com/mmdetection/v2.0/pvt/")
        assert entry.metrics["coco_box_ap"] > 30 and entry.num_params is None


def test_names_and_enum_members() -> None:
    assert get_weights("PVTv2_B0_Weights.DEFAULT") is PVTv2_B0_Weights.IMAGENET1K_V1.value
    assert PVTv2_B2_Li_Weights.IMAGENET1K_TIMM.hf_hub_id == "timm/pvt_v2_b2_li.in1k"
    assert RetinaNet_PVTv2_B0_FPN_Weights.DEFAULT.metrics["coco_box_ap"] == 37.1
    assert list_weights("fcos_pvt_v2_b0_fpn") == []
    assert len(list_weights()) == len(PUBLISHED) == 20
    with pytest.raises(ValueError, match=r"'pvt_v2_b2\.in1k'"):
        get_weights("pvt_v2_b2.in1km")
    with pytest.raises(ValueError, match="unknown model 'pvt_v2_b9'"):
        list_weights("pvt_v2_b9")
    with pytest.raises(TypeError, match="must be a str"):
        get_weights(PVTv2_B0_Weights.DEFAULT)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------


def test_classifier_transforms_match_timms_pretrained_config() -> None:
    timm = pytest.importorskip("timm")
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("pvt_v2_b0.in1k").to_dict())
    theirs = timm.data.create_transform(**config)
    image = Image.fromarray(torch.randint(0, 256, (300, 451, 3), dtype=torch.uint8).numpy())
    ours = PVTv2_B0_Weights.DEFAULT.transforms()
    expected = theirs(image)
    assert expected.shape == (3, 224, 224)
    assert torch.allclose(ours(image), expected, atol=1e-6)
    tensor = pil_to_tensor(image)
    assert (ours(tensor) - expected).abs().mean() < 0.05  # tensors: torch's antialiased bicubic, close to PIL's


def test_detector_transforms_only_make_floats() -> None:
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = RetinaNet_PVTv2_B0_FPN_Weights.DEFAULT.transforms()(image)
    assert out.dtype == torch.float32 and torch.allclose(out, image.float() / 255)
    assert "1333" in RetinaNet_PVTv2_B0_FPN_Weights.DEFAULT.preprocessing.describe()


# ---------------------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------------------


def test_a_name_downloads_once_then_loads_from_the_cache(
    served: tuple[Path, dict[str, Tensor]], torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, expected = served
    asked = serve(monkeypatch, payload)
    model = PVTv2(TINY, num_classes=3, weights="pvt_v2_b0.in1k")
    assert asked == ["https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b0.pth"]
    assert checkpoints(torch_home) == ["pvt_v2_b0.pth"]
    assert model.load_report is not None and model.load_report.layout == "pvt"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    backbone = PVTv2Backbone(TINY, out_indices=(3,), weights=PVTv2_B0_Weights.DEFAULT)  # cached file, no download
    assert len(asked) == 1 and backbone.load_report is not None
    assert backbone.load_report.source == str(torch_home / "hub" / "checkpoints" / "pvt_v2_b0.pth")


@pytest.mark.parametrize("digits", [8, 64])
def test_a_stated_hash_or_prefix_is_checked(served: tuple[Path, dict[str, Tensor]], digits: int) -> None:
    payload, _ = served
    entry = local_entry(payload, sha256=file_sha256(payload)[:digits])
    path = resolve_weights(entry)
    assert path == entry.cache_path and path.read_bytes() == payload.read_bytes()


def test_a_mismatching_download_is_deleted_and_refused(
    tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk.pth"
    torch.save({"w": torch.zeros(2)}, junk)
    serve(monkeypatch, junk)
    with pytest.raises(CheckpointError, match=r"'retinanet_pvt_v2_b0_fpn\.coco_mmdet'.*states 13e9aabe.*deleted"):
        resolve_weights(RetinaNet_PVTv2_B0_FPN_Weights.DEFAULT)
    assert checkpoints(torch_home) == []  # neither the file nor a temp file is left


def test_a_damaged_cached_file_is_replaced(served: tuple[Path, dict[str, Tensor]]) -> None:
    payload, _ = served
    entry = local_entry(payload, sha256=file_sha256(payload)[:8])
    entry.cache_path.parent.mkdir(parents=True)
    entry.cache_path.write_bytes(b"truncated")
    assert resolve_weights(entry).read_bytes() == payload.read_bytes()


def test_a_cached_file_is_used_without_network(torch_home: Path) -> None:
    entry = get_weights("pvt_v2_b3.in1k")  # no hash stated: any file put there by hand is taken
    entry.cache_path.parent.mkdir(parents=True)
    entry.cache_path.write_bytes(b"placed by hand")
    assert resolve_weights("pvt_v2_b3.in1k") == entry.cache_path == torch_home / "hub" / "checkpoints" / "pvt_v2_b3.pth"


def test_offline_errors_name_the_entry_the_url_and_the_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = local_entry(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError) as info:
        resolve_weights(missing)  # the real download function, on a file:// URL that does not exist
    assert "'local.b0'" in str(info.value) and missing.download_url in str(info.value)
    assert str(missing.cache_path) in str(info.value)

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    entry = get_weights("pvt_v2_b1.in1k")
    with pytest.raises(FileNotFoundError, match="name resolution") as info:
        PVTv2(TINY, weights="pvt_v2_b1.in1k")
    assert entry.download_url in str(info.value) and str(entry.cache_path) in str(info.value)


def test_hub_entries_go_through_huggingface_hub(
    served: tuple[Path, dict[str, Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, expected = served
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(hub, "_hf_download", lambda repo, name: asked.append((repo, name)) or payload)
    report = load_weights(PVTv2(TINY, num_classes=3), PVTv2_B0_Weights.IMAGENET1K_TIMM)
    assert asked == [("timm/pvt_v2_b0.in1k", "model.safetensors")] and len(report.loaded) == len(expected)

    def offline(repo: str, name: str) -> Path:
        raise OSError("offline")

    monkeypatch.setattr(hub, "_hf_download", offline)
    entry = PVTv2_B0_Weights.IMAGENET1K_TIMM.value
    with pytest.raises(FileNotFoundError, match="resolve/main/model.safetensors") as info:
        resolve_weights(entry)
    assert str(entry.cache_path) in str(info.value)
    entry.cache_path.parent.mkdir(parents=True)
    shutil.copyfile(payload, entry.cache_path)  # fetched by hand: used as is
    assert resolve_weights(entry) == entry.cache_path


def test_paths_win_and_unknown_names_suggest_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: tuple[Path, dict[str, Tensor]]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(served[0], "pvt_v2_b0.in1k")  # a file named like an entry is that file
    assert resolve_weights("pvt_v2_b0.in1k") == Path("pvt_v2_b0.in1k")
    assert PVTv2(TINY, num_classes=3, weights="pvt_v2_b0.in1k").load_report is not None
    with pytest.raises(FileNotFoundError, match=r"weights file not found: pvt_v2_b1_in1k .*'pvt_v2_b1\.in1k'"):
        PVTv2Backbone(TINY, weights="pvt_v2_b1_in1k")
    with pytest.raises(FileNotFoundError, match=r"^weights file not found: missing\.pth "):
        load_weights(PVTv2Backbone(TINY), "missing.pth")
    state = {"w": torch.zeros(1)}
    assert resolve_source(state) is state and resolve_source("hf-hub:org/name") == "hf-hub:org/name"
    with pytest.raises(TypeError, match="got dict"):
        resolve_weights(state)  # type: ignore[arg-type]


def test_huggingface_hub_is_imported_only_when_used() -> None:
    """``import pvt_backbone`` must not import the optional hub client: only function bodies may."""
    for module in (hub, pvt_backbone.weights.io):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(name.split(".")[0] == "huggingface_hub" for name in names), module.__name__
