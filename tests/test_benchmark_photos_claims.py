"""The photos claims' summary (``benchmarks/photos_claims.py``): what it calls the bar, and the default-vs-DDPM ratio."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_module

photos_claims = benchmark_module("photos_claims")


def _row(run: str, sampler: str, fd: float, filtered: float | None = None) -> dict:
    row = {"run": run, "seed": 2, "nfe": 10, "sampler": sampler, "pixels/fd": fd}
    if filtered is not None:
        row["pixels/filter_uncertainty"] = filtered
    return row


def test_the_bar_is_diffusers_best_and_the_ddpm_ratio_is_best_over_best() -> None:
    rows = [
        _row("B", "--nfe 10", 6.0, filtered=0.9),
        _row("B", "recipe unipc_prior_fusion", 1.0, filtered=1.2),  # ours: never the bar, however good
        _row("B", "diffusers-ddim, trailing", 4.0),
        _row("B", "diffusers-unipc, leading", 3.0),
        _row("ddpm B", "diffusers-ddim, trailing", 2.0),
        _row("ddpm B", "diffusers-unipc, leading", 5.0),
    ]
    summary = photos_claims.bar_summary(rows, ("pixels",))
    photos_claims.add_ddpm_ratio(summary, ("pixels",))
    ours = next(r for r in summary if r["run"] == "B")
    assert ours["pixels/best_peer_fd"] == 3.0
    assert ours["pixels/nfe_vs_best"] == pytest.approx(2.0)
    assert ours["pixels/unipc_prior_fusion_vs_best"] == pytest.approx(1 / 3)
    assert ours["pixels/unipc_prior_fusion_filter_ratio"] == 1.2
    assert ours["pixels/best_vs_ddpm"] == pytest.approx(3.0 / 2.0)  # the same configurations on both networks
    assert "pixels/best_vs_ddpm" not in next(r for r in summary if r["run"] == "ddpm B")
