"""The benchmarks' peer configurations (``benchmarks/peers.py``): the labels stored result rows use name the
diffusers schedulers they were measured with."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_module

peers = benchmark_module("peers")
GRIDS, SCHED, Peer, all_peers, in_old_bar = peers.GRIDS, peers.SCHED, peers.Peer, peers.all_peers, peers.in_old_bar


def test_every_label_names_its_configuration() -> None:
    every = all_peers()
    assert len({p.label for p in every}) == len(every) == 190
    for peer in every:
        assert Peer.from_label(f"diffusers {peer.label}") == peer


def _settings(scheduler) -> dict:
    """A diffusers scheduler's configuration without its bookkeeping (keys starting with "_")."""
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("grid", GRIDS)
def test_the_first_11_labels_build_diffusers_defaults(grid: str) -> None:
    """The first 11 rows were measured with diffusers' schedulers at their defaults on each grid: the same config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    spacing = {"use_karras_sigmas": True} if grid == "karras" else {"timestep_spacing": grid}
    defaults = {"diffusers-dpm++2m": DPMSolverMultistepScheduler(**SCHED, algorithm_type="dpmsolver++", **spacing),
                "diffusers-unipc": UniPCMultistepScheduler(**SCHED, **spacing)}
    if grid != "karras":
        defaults["diffusers-ddim"] = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, **spacing)
    for name, reference in defaults.items():
        peer = Peer.from_label(f"{name}, {grid}")
        assert in_old_bar(peer)
        assert _settings(peer.scheduler()) == _settings(reference), name


@pytest.mark.parametrize("label", ["diffusers-heun, leading", "unipc-3 bh1, leading", "diffusers unipc-3 bh3, leading",
                                   "diffusers unipc-3 bh1, leading, clipped", "diffusers-ddim, karras",
                                   "diffusers-unipc, bogus", "diffusers unipc-3 bh1, nowhere, sigma_min",
                                   "diffusers unipc-3 bh1, leading"])
def test_a_label_of_no_configuration_is_refused(label: str) -> None:
    with pytest.raises(ValueError, match="names no"):
        Peer.from_label(label)
