"""The training preview's time budget (issue 16): the arithmetic with made-up costs, not timings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bdiff.lit.callbacks import SampleGrid
from bdiff.lit.preview import PreviewCost, PreviewPlan, plan_preview, preview_budget, preview_seconds


def test_budget_is_a_share_of_the_run_with_a_floor() -> None:
    assert preview_budget(elapsed=3600, spent=0, max_fraction=0.1, min_seconds=60) == pytest.approx(360)
    # earlier previews count against the share
    assert preview_budget(elapsed=3600, spent=300, max_fraction=0.1, min_seconds=60) == pytest.approx(60)
    assert preview_budget(elapsed=100, spent=0, max_fraction=0.1, min_seconds=60) == 60  # a short run: the floor
    assert preview_budget(elapsed=1e6, spent=0, max_fraction=None, min_seconds=60) is None  # no budget


def test_the_user_report_64_samples_ddim50_8_chains_of_32px_rgb_is_cut_to_fit() -> None:
    """The reported case: 20 training steps, then 64 x DDIM-50 x 8 chains ran 9+ minutes on a CPU.

    Made-up costs of that size: a denoiser call costs 20 ms per 32x32 RGB image, one chain call the
    same per image per chain, so the configured preview would take 50 * 64 * 9 * 0.02 = 576 s.
    """
    cost = PreviewCost(mean_per_image=0.02, chain_per_image=0.02)
    assert preview_seconds(64, 50, 8, cost) == pytest.approx(576)
    plan = plan_preview(64, 50, 8, "chains", cost, budget=60)
    # 1. chains 8 -> 4 (50*64*5*0.02 = 320 s), 2. propagated map (64 s), 3. steps 50 -> 25 (32 s): fits
    assert (plan.num_samples, plan.steps, plan.chains, plan.uncertainty) == (64, 25, 0, "propagated")
    assert plan.seconds == pytest.approx(32) and plan.seconds <= plan.budget
    assert plan.reduced and not plan.over_budget
    line = plan.describe()
    assert line.startswith("preview: 64 samples x DDIM-25, propagated uncertainty map")
    assert "est. 32 s, budget 60 s" in line and "reduced from 64 x DDIM-50 x 8 chains" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("per_image", "expected"),
    [  # budget 60 s; a preview costs steps * samples * per_image * (1 + chains)
        (1e-5, (64, 50, 8, "chains")),  # 0.3 s: everything as configured
        (3e-3, (64, 50, 4, "chains")),  # 8 chains 86 s; 1. 4 chains 48 s
        (0.01, (64, 50, 0, "propagated")),  # 4 chains 160 s; 2. propagated 32 s
        (0.02, (64, 25, 0, "propagated")),  # propagated 64 s; 3. steps 25: 32 s
        (0.05, (32, 20, 0, "propagated")),  # steps 25: 80 s, 20: 64 s (first floor); 4. samples 32: 32 s
        (0.2, (16, 10, 0, "propagated")),  # samples 16 (first floor): 64 s; 5. steps 10: 32 s
        (0.5, (8, 10, 0, "propagated")),  # steps 10: 80 s; 6. samples 8: 40 s
        (10.0, (4, 10, 0, "propagated")),  # the smallest preview, still over: drawn anyway, and said so
    ],
)
def test_the_reductions_come_in_the_documented_order(per_image: float, expected: tuple) -> None:
    cost = PreviewCost(per_image, per_image)
    plan = plan_preview(64, 50, 8, "chains", cost, budget=60)
    assert (plan.num_samples, plan.steps, plan.chains, plan.uncertainty) == expected
    assert plan.seconds == pytest.approx(preview_seconds(plan.num_samples, plan.steps, plan.chains, cost))
    assert plan.over_budget == (per_image == 10.0)
    assert plan.reduced == (per_image > 1e-5)
    if plan.over_budget:
        assert "over the budget even at its smallest" in plan.describe()


def test_chains_are_halved_before_they_are_dropped() -> None:
    cost = PreviewCost(mean_per_image=0.001, chain_per_image=0.001)  # 8 chains: 28.8 s, 4 chains: 16 s
    plan = plan_preview(64, 50, 8, "chains", cost, budget=20)
    assert (plan.chains, plan.uncertainty, plan.steps, plan.num_samples) == (4, "chains", 50, 64)
    assert "uncertainty from 4 posterior chains" in plan.describe()


def test_expensive_chains_on_a_cheap_mean_network_keep_every_step() -> None:
    """Sampled-weights chains can cost far more than the (closed-form) mean pass: only the chains go."""
    cost = PreviewCost(mean_per_image=0.001, chain_per_image=0.1)
    plan = plan_preview(64, 50, 8, "chains", cost, budget=60)
    assert (plan.num_samples, plan.steps, plan.uncertainty) == (64, 50, "propagated")


def test_nothing_is_cut_below_what_was_configured_or_the_minimums() -> None:
    cost = PreviewCost(1.0, 1.0)
    small = plan_preview(16, 5, 8, "chains", cost, budget=1)  # the debug config's preview
    assert (small.num_samples, small.steps) == (4, 5)  # steps stay at the configured 5 (below min_steps)
    custom = plan_preview(64, 50, 8, "chains", cost, budget=1, min_samples=32, min_steps=40)
    assert (custom.num_samples, custom.steps) == (32, 40)
    none = plan_preview(64, 50, 8, "none", PreviewCost(1e-6), budget=60)  # deterministic model: no chains ever
    assert (none.chains, none.uncertainty) == (0, "none") and "deterministic" in none.describe()
    free = plan_preview(64, 50, 8, "chains", None, budget=None)  # no budget: as configured, nothing timed
    assert (free.num_samples, free.steps, free.chains) == (64, 50, 8) and math.isnan(free.seconds)
    assert "est." not in free.describe()
    with pytest.raises(ValueError, match="uncertainty"):
        plan_preview(64, 50, 8, "mc", cost, budget=1)  # type: ignore[arg-type]


def test_sample_grid_budget_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = SampleGrid()
    assert grid.budget() == 60  # before training: the floor
    clock = iter([1000.0, 1000.0 + 3600])
    monkeypatch.setattr("bdiff.lit.callbacks.time.perf_counter", lambda: next(clock))
    grid._train_start = next(clock)
    assert grid.budget() == pytest.approx(360)
    assert SampleGrid(max_fraction=None).budget() is None
    assert grid.state_dict() == {"last_step": 0}  # exact resume: the budget adds nothing to checkpoints
    for bad in ({"uncertainty": "mc"}, {"max_fraction": 0.0}, {"max_fraction": 2.0}, {"min_seconds": -1},
                {"min_samples": 0}, {"min_steps": 0}):
        with pytest.raises(ValueError, match="SampleGrid"):
            SampleGrid(**bad)


class _FakeTrainer:
    """What SampleGrid._draw reads from a trainer (no checkpoint callback, no loggers)."""

    def __init__(self, root: Path) -> None:
        self.checkpoint_callback = None
        self.default_root_dir = str(root)
        self.loggers: list = []
        self.global_step = 0
        self.progress_bar_callback = None


def _tiny_module() -> torch.nn.Module:
    from bdiff.lit.module import DiffusionModule
    from bdiff.nets import UNetConfig

    torch.manual_seed(0)
    return DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), lr_warmup_steps=0)


def test_sample_grid_draws_what_its_plan_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) draw: with a tight budget and a large fake cost the preview shrinks and the PNG follows."""
    from bdiff.lit import callbacks

    module = _tiny_module()
    trainer = _FakeTrainer(tmp_path)
    roomy = SampleGrid(every_n_steps=0, num_samples=4, steps=3, chains=2)
    roomy._draw(trainer, module, "roomy")
    assert (roomy.last_plan.num_samples, roomy.last_plan.steps, roomy.last_plan.uncertainty) == (4, 3, "chains")
    assert roomy.last_seconds is not None and roomy.last_seconds > 0

    monkeypatch.setattr(callbacks, "measure_cost", lambda *a, **k: PreviewCost(10.0, 10.0))  # 10 s per image call
    tight = SampleGrid(every_n_steps=0, num_samples=16, steps=20, chains=8, min_seconds=1, min_samples=4, min_steps=2)
    png = tight._draw(trainer, module, "tight")
    plan = tight.last_plan
    assert isinstance(plan, PreviewPlan) and plan.uncertainty == "propagated" and plan.over_budget
    assert (plan.num_samples, plan.steps) == (4, 2)
    from PIL import Image

    assert Image.open(png).size[1] == 2 * (8 * 4 + 2) + 2  # a 2x2 grid of 4x-upscaled 8x8 samples, 2 px padding
    assert module.denoiser.training  # put back in training mode


def test_a_deterministic_model_draws_without_chains(tmp_path: Path) -> None:
    from bdiff.bayes import BayesConfig
    from bdiff.lit.module import DiffusionModule
    from bdiff.nets import UNetConfig

    module = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), bayes=BayesConfig(layers="none"),
                             lr_warmup_steps=0)
    grid = SampleGrid(every_n_steps=0, num_samples=4, steps=3)
    grid._draw(_FakeTrainer(tmp_path), module, "final", final=True)
    assert (grid.last_plan.uncertainty, grid.last_plan.chains) == ("none", 0)
    assert "4 samples x DDIM-3, no uncertainty map (deterministic model)" in grid.last_plan.describe()
