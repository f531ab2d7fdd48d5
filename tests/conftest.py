import pytest
import torch

from pvt_backbone import PVTv2Config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> PVTv2Config:
    """Four stages, one block each, narrow: builds and runs in milliseconds."""
    return PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
