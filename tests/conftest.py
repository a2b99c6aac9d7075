"""Shared fixtures. OMP threads sleep instead of spinning: on 2 cores, spinning OpenMP workers of
two processes (a test and a Ray worker, say) slow each other down by orders of magnitude."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from nitro_dist.config import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return load_config("tiny", list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_models():
    from nitro_dist.models.builders import build_tiny_sdxl

    return build_tiny_sdxl(0)
