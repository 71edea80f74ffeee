"""An ensemble of small eps heads on the frozen trunk, with randomized prior functions.

Osband, Aslanides & Cassirer 2018 ("Randomized Prior Functions for Deep RL"): member m predicts

    eps_m(h) = f_m(h) + beta * p_m(h)

where p_m is a fixed, randomly initialised copy of the head architecture (never trained) and
f_m is trained by L_simple on its own bootstrap resample of the data ("double-or-nothing"
weights per image and member). Where the data pin the members down they agree; away from the
data each keeps its own random prior, so their spread (the epistemic variance) grows. For a
linear head this is exact posterior sampling of Bayesian linear regression (their Lemma 3),
i.e. the sampled counterpart of :mod:`heldout_baselines.laplace`; with a hidden layer it is the
cheap "ensemble of branches on a frozen trunk" of DECU (Berry et al., UAI 2024).

All M members are one grouped-conv stack (a 3x3 conv to M*hidden channels, SiLU, a grouped
3x3 conv to M*C): one call evaluates every member. The trunk runs once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from bdiff.bayes.head import head_at
from bdiff.bayes.model import BayesianUNet
from bdiff.denoiser import Prediction
from bdiff.schedule import NoiseSchedule
from heldout_baselines.laplace import trunk_features


class MemberHeads(nn.Module):
    """M two-layer conv heads in one grouped stack: h (B,C_h,H,W) -> (M,B,C,H,W)."""

    def __init__(self, in_channels: int, out_channels: int, members: int, hidden: int) -> None:
        super().__init__()
        self.members, self.out_channels = members, out_channels
        self.hidden = nn.Conv2d(in_channels, members * hidden, 3, padding=1)
        self.out = nn.Conv2d(members * hidden, members * out_channels, 3, padding=1, groups=members)

    def forward(self, h: Tensor) -> Tensor:
        y = self.out(nn.functional.silu(self.hidden(h)))
        return y.unflatten(1, (self.members, self.out_channels)).transpose(0, 1)


class HeadEnsemble(nn.Module):
    """Randomized-prior ensemble of eps heads on a trained model's (frozen) trunk; a Denoiser.

    ``predict``: eps and the aleatoric variance of the trained model at its posterior-mean
    weights (sample quality is the trained model's), epistemic = variance over the M members.

    Args:
        model: the trained Bayesian U-Net (frozen).
        schedule: its noise schedule.
        members: M.
        hidden: hidden channels per member.
        prior_scale: beta, the weight of each member's fixed random prior head.
        seed: initialisation of the trainable and the prior heads.
    """

    def __init__(
        self,
        model: BayesianUNet,
        schedule: NoiseSchedule,
        members: int = 8,
        hidden: int = 16,
        prior_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"a head ensemble needs >= 2 members, got {members}")
        self.model, self.schedule, self.prior_scale = model, schedule, prior_scale
        c_h, c = model.net.config.base_channels, model.net.config.in_channels
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.heads = MemberHeads(c_h, c, members, hidden)
            self.priors = MemberHeads(c_h, c, members, hidden).requires_grad_(False)
        self.weights = {name: loc.detach() for name, (loc, _) in model.posterior_loc_scale().items()}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return trunk_features(self.model.net, self.weights, x_t, t)

    def members_eps(self, h: Tensor) -> Tensor:
        """(B,C_h,H,W) -> every member's eps (M,B,C,H,W)."""
        return self.heads(h) + self.prior_scale * self.priors(h)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        h = self.features(x_t, t)
        eps, log_var = head_at(self.model.net, self.weights, h)
        with torch.no_grad():
            spread = self.members_eps(h).var(0)
        return Prediction(eps, spread, log_var.exp())

    def fit(
        self,
        batches: Iterable[Tensor],
        steps: int,
        lr: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> list[float]:
        """Train the member heads by L_simple with double-or-nothing bootstrap weights; returns the losses.

        ``batches``: an iterable of x0 (B,C,H,W) in [-1,1], cycled until ``steps`` steps are done.
        """

        def errors(x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
            return (self.members_eps(self.features(x_t, t)) - noise).pow(2).flatten(2).mean(2)

        return fit_bootstrap(errors, self.heads.parameters(), self.heads.members, self.schedule, batches, steps, lr,
                             generator, "HeadEnsemble.fit")


def fit_bootstrap(
    member_errors: Callable[[Tensor, Tensor, Tensor], Tensor],
    parameters: Iterable[nn.Parameter],
    members: int,
    schedule: NoiseSchedule,
    batches: Iterable[Tensor],
    steps: int,
    lr: float,
    generator: torch.Generator | None,
    who: str,
) -> list[float]:
    """Adam on L_simple with one double-or-nothing bootstrap weight per (member, image) (Osband et al. 2016).

    ``member_errors(x_t, t, noise)`` gives each member's per-image squared eps error (M,B);
    ``batches`` of x0 (B,C,H,W) in [-1,1] are cycled until ``steps`` steps are done. Returns the losses.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    data = list(batches)
    if not data:
        raise ValueError(f"{who} needs at least one batch of images")
    opt = torch.optim.Adam(parameters, lr=lr)
    # One fixed weight (0 or 2) per member and image: each member's own bootstrap resample.
    boots = [2.0 * torch.randint(0, 2, (members, x0.shape[0]), generator=generator).float() for x0 in data]
    losses: list[float] = []
    for step in range(steps):
        x0, boot = data[step % len(data)], boots[step % len(data)]  # (B,C,H,W), (M,B)
        t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = (boot * member_errors(schedule.q_sample(x0, t, noise), t, noise)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
