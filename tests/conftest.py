"""Shared test setup: `cuda`-marked tests are skipped where no GPU is visible (CI), so that `pytest -m cuda`
on the device runs exactly them."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on the device)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
