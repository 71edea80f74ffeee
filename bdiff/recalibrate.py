"""Fit the epistemic error scale r(t) and the Wiener-filter fallback of a checkpoint and store them in it.

    python -m bdiff.recalibrate --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--out fitted.ckpt]

``train.py`` fits both at the last validation of every run (:mod:`bdiff.bayes.error_scale`,
:mod:`bdiff.bayes.prior_fusion`); this command adds them to a checkpoint without them (trained
before they existed, or saved at an earlier validation), on the same data and images the run would
use (the checkpoint's own datamodule and split). The checkpoint is replaced atomically (``--out``
writes a copy instead); prints, per knot, r(t) with the measured excess error, and w(t) with the
held-out x0 error of the network, of the Wiener filter and of their combination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from bdiff.bayes.error_scale import (
    EpistemicErrorScale,
    error_scale_images,
    fit_denoiser_error_scale,
)
from bdiff.bayes.predictive import BayesianDenoiser
from bdiff.bayes.prior_fusion import PriorWeight, fit_denoiser_prior, prior_images
from bdiff.checkpoint import datamodule_of, load_model, read_checkpoint
from bdiff.console import ArgumentParser, exit_on_user_error, program_name
from bdiff.files import atomic_path
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.lit.module import DiffusionModule


def fit_for_checkpoint(path: str | Path, denoiser: BayesianDenoiser | None = None) -> EpistemicErrorScale:
    """r(t) for the checkpoint at ``path`` (``denoiser``: its loaded model, if at hand), on its own data's split."""
    denoiser = denoiser if denoiser is not None else load_model(path)
    if not denoiser.is_bayesian:
        raise ValueError(f"{str(path)!r} holds a model with no epistemic variance: there is no error scale to fit")
    dm = datamodule_of(read_checkpoint(path))
    dm.setup("fit")
    train, val = error_scale_images(dm.train_dataset, dm.val_dataset, DiffusionModule.MAX_CALIBRATION_PIXELS)
    return fit_denoiser_error_scale(denoiser, train, val)


def fit_prior_for_checkpoint(path: str | Path, denoiser: BayesianDenoiser | None = None
                             ) -> tuple[GaussianDenoiser, PriorWeight]:
    """The Wiener filter and w(t) for the checkpoint at ``path``, on its own data's split, as training fits them."""
    denoiser = denoiser if denoiser is not None else load_model(path)
    dm = datamodule_of(read_checkpoint(path))
    dm.setup("fit")
    train, val = prior_images(dm.train_dataset, dm.val_dataset, DiffusionModule.PRIOR_IMAGES)
    return fit_denoiser_prior(denoiser, train, val)


def refit(path: str | Path, out: str | Path | None = None) -> tuple[EpistemicErrorScale | None, PriorWeight]:
    """Fit r(t) (a Bayesian model only) and the Wiener-filter fallback for the checkpoint at ``path``, and write the
    checkpoint with them to ``out`` (default: ``path``)."""
    denoiser = load_model(path)
    scale = fit_for_checkpoint(path, denoiser) if denoiser.is_bayesian else None
    prior, weight = fit_prior_for_checkpoint(path, denoiser)
    ckpt = read_checkpoint(path)
    if scale is not None:
        ckpt["epistemic_error_scale"] = scale.to_dict()
    ckpt["gaussian_prior"], ckpt["prior_weight"] = prior.to_dict(), weight.to_dict()
    with atomic_path(Path(out or path)) as tmp:
        torch.save(ckpt, tmp)
    return scale, weight


def main(argv: list[str] | None = None) -> tuple[EpistemicErrorScale | None, PriorWeight]:
    """``python -m bdiff.recalibrate``: refit r(t) and w(t) of ``--ckpt`` and print them per knot."""
    p = ArgumentParser(prog=program_name("bdiff-recalibrate", "bdiff.recalibrate"), description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint written by train.py")
    p.add_argument("--out", type=Optional[str], default=None, help="write the result here instead of replacing --ckpt")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also BDIFF_DEBUG=1)")
    args = p.parse_args(argv)
    scale, weight = refit(args.ckpt, args.out)
    if scale is not None:
        print("| t | r(t) | excess error | standard error |\n|---|---|---|---|")
        for row in zip(scale.knots, scale.scale, scale.excess, scale.standard_error):
            print("| {} | {:.4g} | {:.4g} | {:.2g} |".format(*row))
    print("\n| t | w(t) | x0 error: network | Wiener filter | combined |\n|---|---|---|---|---|")
    for row in zip(weight.knots, weight.weight, weight.net_mse, weight.prior_mse, weight.fused_mse):
        print("| {} | {:.3f} | {:.4g} | {:.4g} | {:.4g} |".format(*row))
    print(f"wrote {args.out or args.ckpt}")
    return scale, weight


if __name__ == "__main__":
    exit_on_user_error(main)
