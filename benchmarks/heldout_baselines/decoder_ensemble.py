"""Decoder branches on a frozen encoder: epistemic variance from where the U-Net's skips go.

Every posterior that only reads the trunk's *final* features is blind to an unseen digit class
(BENCHMARKS.md, "Held-out digit class": feature collapse), while a deep ensemble of whole
networks is not. This design sits in between, after DECU (Berry et al., UAI 2024: ensembles of
branches on a frozen pretrained trunk): the trained model's encoder (time embedding, stem, down
path, bottleneck) is frozen and shared, and M freshly initialised copies of the decoder (up path
with its skip connections, final norm, head) are trained on it by L_simple, each on its own
double-or-nothing bootstrap of the data (Osband et al. 2016). The decoders see the encoder's
full-resolution skips, i.e. near-input features of an unseen image, so independently initialised
members extrapolate differently there: their spread is the epistemic variance.

``predict`` keeps the trained model's eps and aleatoric variance (sample quality is the trained
model's); only the epistemic part comes from the members. The encoder runs once per call; the
members are one ``torch.func.vmap`` over stacked parameters (:func:`torch.func.stack_module_state`
style), so one call evaluates all of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bdiff.bayes.head import head_at, require_point_trunk
from bdiff.bayes.model import BayesianUNet
from bdiff.denoiser import Prediction
from bdiff.nets.unet import UNet
from bdiff.schedule import NoiseSchedule
from heldout_baselines.head_ensemble import fit_bootstrap

DECODER_PREFIXES = ("up.", "out_norm.", "head.")


class _Decoder(nn.Module):
    """``net.decode`` and the head as one forward, so ``functional_call`` can substitute the decoder's weights."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        return self.net.head(self.net.decode(h, skips, emb))


class DecoderEnsemble(nn.Module):
    """M decoder branches on a trained model's frozen encoder; a Denoiser.

    Args:
        model: the trained Bayesian U-Net; only its head may be Bayesian (the encoder and the
            trained decoder are used at their point values).
        schedule: its noise schedule.
        members: M >= 2 decoders, each initialised as a fresh U-Net's decoder (seed ``seed + m``).
        seed: initialisation seed of the first member.

    Raises:
        ValueError: fewer than two members, or Bayesian layers outside the head.
    """

    def __init__(self, model: BayesianUNet, schedule: NoiseSchedule, members: int = 4, seed: int = 0) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"a decoder ensemble needs >= 2 members, got {members}")
        require_point_trunk(model, "DecoderEnsemble")
        self.model, self.schedule, self.members = model, schedule, members
        self.weights = {name: loc.detach() for name, (loc, _) in model.posterior_loc_scale().items()}
        self.decoder = _Decoder(model.net)
        fresh = []
        with torch.random.fork_rng():
            for m in range(members):
                torch.manual_seed(seed + m)
                fresh.append(dict(UNet(model.net.config).named_parameters()))
        self.names = [n for n in fresh[0] if n.startswith(DECODER_PREFIXES)]
        self.stacked = nn.ParameterList(
            [nn.Parameter(torch.stack([f[n].detach() for f in fresh])) for n in self.names]
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def members_eps(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        """Encoder outputs -> every member's eps (M,B,C,H,W)."""
        params = {f"net.{n}": p for n, p in zip(self.names, self.stacked, strict=True)}

        def one(member: dict[str, Tensor]) -> Tensor:
            return functional_call(self.decoder, member, (h, skips, emb), strict=False)

        out = vmap(one)(params)  # (M,B,2C,H,W)
        return out[:, :, : self.model.net.config.in_channels]

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        net = self.model.net
        with torch.no_grad():
            h, skips, emb = net.encode(x_t, t)
            eps, log_var = head_at(net, self.weights, net.decode(h, skips, emb))
            spread = self.members_eps(h, skips, emb).var(0)
        return Prediction(eps, spread, log_var.exp())

    def fit(self, batches: Iterable[Tensor], steps: int, lr: float = 1e-3,
            generator: torch.Generator | None = None) -> list[float]:
        """Train the decoder members as :meth:`HeadEnsemble.fit` trains heads (:func:`fit_bootstrap`); the losses."""

        def errors(x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
            with torch.no_grad():
                h, skips, emb = self.model.net.encode(x_t, t)
            return (self.members_eps(h, skips, emb) - noise).pow(2).flatten(2).mean(2)

        return fit_bootstrap(errors, self.stacked.parameters(), self.members, self.schedule, batches, steps, lr,
                             generator, "DecoderEnsemble.fit")
