"""Shared test helpers: named tolerances, error reports, and tiny checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dscompile.tolerance import OP_TOLERANCE, TOLERANCE, bound


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "",
                 table: dict = TOLERANCE) -> None:
    """Assert the named tolerance of `dtype`; the failure message reports max and mean error."""
    actual, ref = actual.detach().double().cpu(), ref.detach().double().cpu()
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    err = (actual - ref).abs()
    limit = bound(dtype, float(ref.abs().max()) if ref.numel() else 0.0, table)
    max_err = float(err.max()) if err.numel() else 0.0
    mean_err = float(err.mean()) if err.numel() else 0.0
    assert max_err <= limit, f"{what}: max |Δ| {max_err:.3g} > {limit:.3g} (mean |Δ| {mean_err:.3g})"


def assert_op_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """assert_close with the single-op table (an op against its reference implementation)."""
    assert_close(actual, ref, dtype, what, table=OP_TOLERANCE)


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(variant, **options) -> path of a tiny checkpoint, generated once per set of options."""
    from dscompile.model.synthetic import make_checkpoint

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
