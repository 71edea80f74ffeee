"""Autoguidance (Karras et al. 2024): the sampler sees eps + w (eps - eps_guide), and pays for the guide's calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdiff.checkpoint import load_model
from bdiff.denoiser import Prediction
from bdiff.sampling import Sampler, UniPC
from bdiff.sampler_callbacks.autoguidance import Autoguidance
from bdiff.sampling.recipe import load_recipe
from bdiff.schedule import NoiseSchedule


class Linear:
    """eps_hat = c(t) x with epistemic variance v(t): c = ``c_high`` at t > ``switch``, else ``c_low``."""

    image_shape = (1, 4, 4)
    is_bayesian = True

    def __init__(self, c_low: float, c_high: float | None = None, v: float = 0.01, switch: int = -1,
                 kind: str = "cosine") -> None:
        self.schedule = NoiseSchedule(kind)
        self.c_low, self.c_high, self.v, self.switch = c_low, c_low if c_high is None else c_high, v, switch

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        c = torch.where(t > self.switch, self.c_high, self.c_low).to(x.dtype).view(-1, 1, 1, 1)
        ones = torch.ones_like(x)
        return Prediction(c * x, self.v * ones, 0.3 * ones)


def test_guided_sampling_equals_sampling_the_extrapolated_network() -> None:
    """eps' = (1 + w) eps_1 - w eps_0 at every step, and the epistemic variance scaled by (1 + w)^2."""
    w = 0.7
    guided = Sampler(Linear(0.5), UniPC(), 6, [Autoguidance(Linear(0.4, v=5.0), weight=w)]).sample(5, seed=2, clip=False)
    reference = Sampler(Linear((1 + w) * 0.5 - w * 0.4, v=0.01 * (1 + w) ** 2), UniPC(), 6).sample(5, seed=2, clip=False)
    torch.testing.assert_close(guided.images, reference.images)
    torch.testing.assert_close(guided.variance, reference.variance)
    assert guided.nfe.tolist() == [12] * 5  # every guided step costs two denoiser calls


def test_t_range_guides_only_there_and_only_pays_there() -> None:
    w, grid = 1.0, 6
    sampler = Sampler(Linear(0.5), UniPC(), grid, [Autoguidance(Linear(0.3), weight=w, t_range=(500, 999))])
    guided_steps = int((sampler.grid[:-1] >= 500).sum())
    assert 0 < guided_steps < grid
    guided = sampler.sample(4, seed=1, clip=False)
    reference = Sampler(Linear(0.5, c_high=(1 + w) * 0.5 - w * 0.3, v=0.01, switch=499), UniPC(), grid)
    torch.testing.assert_close(guided.images, reference.sample(4, seed=1, clip=False).images)
    assert guided.nfe.tolist() == [grid + guided_steps] * 4


def test_a_guide_that_equals_the_model_changes_nothing_but_the_cost(last_ckpt: Path) -> None:
    """Read from a checkpoint through a recipe: the trained model guiding itself is the plain sampler."""
    recipe = {"stepper": "UniPC", "steps": 4,
              "callbacks": [{"class_path": "Autoguidance", "init_args": {"guide": str(last_ckpt), "weight": 2.0}}]}
    denoiser = load_model(last_ckpt)
    guided = load_recipe(recipe).build(denoiser).sample(3, seed=0)
    plain = load_recipe({"stepper": "UniPC", "steps": 4}).build(denoiser).sample(3, seed=0)
    torch.testing.assert_close(guided.images, plain.images)
    assert guided.nfe.tolist() == [8] * 3 and plain.nfe.tolist() == [4] * 3


def test_a_guide_for_another_schedule_or_image_is_refused() -> None:
    with pytest.raises(ValueError, match="noise schedule differs"):
        Sampler(Linear(0.5), UniPC(), 4, [Autoguidance(Linear(0.4, kind="linear"))])
    other = Linear(0.4)
    other.image_shape = (1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        Sampler(Linear(0.5), UniPC(), 4, [Autoguidance(other)])


@pytest.mark.parametrize(("options", "message"), [
    ({"guide": "no/such/guide.ckpt"}, "does not exist"),
    ({"guide": "GUIDE", "weight": -0.5}, "autoguidance weight"),
    ({"guide": "GUIDE", "t_range": [500, 100]}, "t_range"),
])
def test_bad_options_are_refused_with_their_name(options: dict, message: str, tmp_path: Path) -> None:
    guide = tmp_path / "guide.ckpt"
    guide.write_bytes(b"")
    options = {k: str(guide) if v == "GUIDE" else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        load_recipe({"stepper": "UniPC", "steps": 4, "callbacks": [{"class_path": "Autoguidance", "init_args": options}]})
