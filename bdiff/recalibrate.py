"""Fit the epistemic error scale r(t) of a checkpoint and store it in the checkpoint.

    python -m bdiff.recalibrate --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--out fitted.ckpt]

``train.py`` fits r(t) at the last validation of every run (:mod:`bdiff.bayes.error_scale`); this
command adds it to a checkpoint without one (trained before it existed, or saved at an earlier
validation), on the same data and images the run would use (the checkpoint's own datamodule and split). The checkpoint is replaced atomically (``--out`` writes a copy instead);
prints r(t) and the measured excess error per knot.
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
from bdiff.checkpoint import datamodule_of, load_model, read_checkpoint
from bdiff.console import ArgumentParser, exit_on_user_error, program_name
from bdiff.files import atomic_path
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


def refit(path: str | Path, out: str | Path | None = None) -> EpistemicErrorScale:
    """Fit r(t) for the checkpoint at ``path`` and write the checkpoint with it to ``out`` (default: ``path``)."""
    scale = fit_for_checkpoint(path)
    ckpt = read_checkpoint(path)
    ckpt["epistemic_error_scale"] = scale.to_dict()
    with atomic_path(Path(out or path)) as tmp:
        torch.save(ckpt, tmp)
    return scale


def main(argv: list[str] | None = None) -> EpistemicErrorScale:
    """``python -m bdiff.recalibrate``: refit r(t) of ``--ckpt`` and print it per knot."""
    p = ArgumentParser(prog=program_name("bdiff-recalibrate", "bdiff.recalibrate"), description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint written by train.py")
    p.add_argument("--out", type=Optional[str], default=None, help="write the result here instead of replacing --ckpt")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also BDIFF_DEBUG=1)")
    args = p.parse_args(argv)
    scale = refit(args.ckpt, args.out)
    print("| t | r(t) | excess error | standard error |\n|---|---|---|---|")
    for row in zip(scale.knots, scale.scale, scale.excess, scale.standard_error):
        print("| {} | {:.4g} | {:.4g} | {:.2g} |".format(*row))
    print(f"wrote {args.out or args.ckpt}")
    return scale


if __name__ == "__main__":
    exit_on_user_error(main)
