"""Doctest namespace: every docstring example in the packages runs under ``make test`` with these names in scope."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import heads
import pvt_backbone
from pvt_backbone import backbone, classifier, config, detection, registry, segmentation, weights


@pytest.fixture(autouse=True)
def _doctest_namespace(request: pytest.FixtureRequest, doctest_namespace: dict, tmp_path, monkeypatch) -> None:
    if not isinstance(request.node, pytest.DoctestItem):
        return
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    doctest_namespace.update(torch=torch, nn=nn, heads=heads, pvt_backbone=pvt_backbone)
    for module in (pvt_backbone, config, backbone, classifier, detection, segmentation, weights, registry, heads):
        doctest_namespace.update({name: getattr(module, name) for name in module.__all__})
