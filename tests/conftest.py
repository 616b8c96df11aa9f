"""Shared test helpers: named tolerances, error reports, and tiny checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Max |Δ| <= TOL * max(1, max|ref|) (DESIGN.md, Verification).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "") -> None:
    """Assert the DESIGN.md tolerance; the failure message reports max and mean error."""
    actual, ref = actual.detach().float(), ref.detach().float()
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    err = (actual - ref).abs()
    bound = TOLERANCE[dtype] * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    max_err = float(err.max()) if err.numel() else 0.0
    assert max_err <= bound, f"{what}: max |Δ| {max_err:.3g} > {bound:.3g} (mean |Δ| {float(err.mean()):.3g})"


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(variant, **options) -> path of a tiny checkpoint, generated once per set of options."""
    from model.synthetic import make_checkpoint

    cache: dict[tuple, Path] = {}

    def make(variant: str = "v3", **kw) -> Path:
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([variant] + [f"{k}{v}" for k, v in sorted(kw.items())])
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt") / name, variant, **kw)
        return cache[key]

    return make


def pytest_collection_modifyitems(config, items):
    """Make sure Triton runs through its CPU interpreter in tests when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
