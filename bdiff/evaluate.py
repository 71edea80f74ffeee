"""Evaluate a samples file (and optionally the checkpoint's calibration).

    python -m bdiff.evaluate --samples samples.npz [--ckpt last.ckpt] [--out-dir eval] [--wandb-project bdiff]

Options can also come from a YAML file (``--config``; ``--print_config`` prints one), as for train.py.

Prints Markdown tables and writes ``metrics.json``, ``metrics.md`` and (with
``--ckpt``) ``reliability.png`` into ``--out-dir``.

The real data is the training data of the checkpoint the samples came from (the samples file
names it; ``--data-ckpt`` names another): the training split is the reference of every quality
number, the validation split that of calibration. Quality is reported in every feature space
named by ``--features``; the default is three spaces built differently: for the digits ``digits``
(a small CNN classifier of the real digits, trained by ``python -m bdiff.lit.feature_module
cache`` or here with ``--train-features-if-missing``), ``digits_mlp`` (a fully connected
classifier from another seed) and ``pixels``; for other labelled data (an image folder)
``classifier`` and ``classifier_mlp`` (the same two classifiers, of the data's own classes, e.g.
which photo a crop came from) and ``pixels``. ``inception`` is the standard FID network when
torch-fidelity and its weights are installed. The first space is the primary one: its numbers
are also the top-level ``fd``/``kid``/... keys. Reference features are cached.
For samples with a variance map, ``filtering`` reports, per space, FD, precision, recall and
classifier error after dropping the 20% least certain by the file's per-sample ``score`` (else
the score computed from the maps) against dropping a random 20%.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, Namespace

from bdiff.console import ArgumentParser, exit_on_user_error, program_name
from bdiff.metrics.calibration import (
    calibration_at_t,
    plot_reliability,
    reliability_at_t,
)
from bdiff.metrics.references import RealData, references_for
from bdiff.metrics.report import (
    evaluate_sample_set,
    filtering_in_spaces,
    markdown_table,
    quality_in_spaces,
)
from bdiff.metrics.samples_file import SampleSet, load_samples
from bdiff.metrics.usefulness import sample_score

CALIBRATION_T = (10, 50, 100, 250, 500, 750, 950)


def calibration_report(ckpt: str, out_dir: Path, data: RealData | None = None) -> list[dict[str, Any]]:
    """Calibration of the checkpoint's variances on the validation images of ``data`` (default: the digits) at a
    grid of t, plus a reliability plot."""
    from bdiff.checkpoint import load_model

    data = data if data is not None else RealData.digits()
    denoiser = load_model(ckpt)
    x0 = data.val * 2 - 1
    rows = calibration_at_t(denoiser, x0, CALIBRATION_T, torch.Generator().manual_seed(0))
    curves = reliability_at_t(denoiser, x0, 250, torch.Generator().manual_seed(0))
    plot_reliability(curves, out_dir / "reliability.png", title="validation images, t = 250")
    return rows


def real_data(samples: SampleSet, data_ckpt: str | None = None) -> RealData:
    """The training data of ``data_ckpt``, else of the checkpoint that made ``samples``: the digits unless the
    checkpoint trained on another datamodule (then rebuilt from the options it saved)."""
    ckpt = data_ckpt or samples.config.get("ckpt")
    if ckpt is None or not Path(ckpt).is_file():
        if tuple(samples.images.shape[1:]) == (1, 8, 8):
            return RealData.digits()
        raise FileNotFoundError(f"the samples' checkpoint {ckpt!r} is not there, so their real data is unknown: pass the "
                                "checkpoint of the run they came from with --data-ckpt")
    return data_of_checkpoint(ckpt)


def data_of_checkpoint(path: str | Path) -> RealData:
    """The training data of the checkpoint at ``path``: the digits, or its datamodule rebuilt from the options it saved."""
    from bdiff.checkpoint import datamodule_of, read_checkpoint

    checkpoint = read_checkpoint(path)
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    if str(hp.get("_class_path", "")).endswith(".DigitsDataModule"):
        return RealData.digits()  # the full split of seed 0, whatever share of it the run trained on
    return RealData.of_datamodule(datamodule_of(checkpoint))


def log_to_wandb(project: str, metrics: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    """Log the scalar metrics (per feature space as ``<space>/<metric>``) to W&B; never fails the evaluation.

    When the samples file came from ``bdiff.sample --wandb-project`` with the same project, the
    metrics go into that sampling run (resumed by id), beside its per-sample table.
    """
    from bdiff.wandb_log import SafeRun

    linked = config.get("wandb") or {}
    same_run = {"id": linked["run_id"], "resume": "allow"} if linked.get("run_id") and linked.get("project") == project else {}
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    flat.update({f"{space}/{k}": v for space, row in metrics["spaces"].items() for k, v in row.items()})
    run = SafeRun(project, dir=out_dir, job_type="evaluate", config=config, **same_run)
    run.log(lambda: flat, "evaluation metrics")
    run.finish()


def parse_args(argv: list[str] | None = None) -> Namespace:
    """The command line (jsonargparse; a bad option ends in one line and exit status 2)."""
    p = ArgumentParser(prog=program_name("bdiff-evaluate", "bdiff.evaluate"), description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile, help="the options below as YAML (e.g. saved with --print_config)")
    p.add_argument("--samples", type=str, required=True, help="samples.npz written by python -m bdiff.sample")
    p.add_argument("--ckpt", type=Optional[str], default=None, help="checkpoint, for calibration on held-out data")
    p.add_argument("--data-ckpt", type=Optional[str], default=None,
                   help="checkpoint whose training data is the real data (default: the one the samples came from)")
    p.add_argument("--features", nargs="+", default=None,
                   help="feature spaces (the first is the primary one): digits, digits_mlp, classifier, classifier_mlp, "
                        "pixels, inception (default: three spaces for the data)")
    p.add_argument("--fallback", type=Optional[str], default=None, help="extractor to use if --features is unavailable")
    p.add_argument("--train-features-if-missing", action="store_true",
                   help="train the classifier feature nets whose cached weights are missing (seconds to minutes on a CPU)")
    p.add_argument("--out-dir", type=Optional[str], default=None, help="default: next to the samples file")
    p.add_argument("--wandb-project", type=Optional[str], default=None, help="also log the metrics to this W&B project")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also BDIFF_DEBUG=1)")
    return p.parse_args(argv)


def sample_metrics(samples: SampleSet, references: dict[str, tuple[torch.nn.Module, torch.Tensor]],
                   primary: str) -> dict[str, Any]:
    """Quality in every feature space of ``references`` (``primary``'s also at the top level) and, for samples
    with variance maps, filtering by the per-sample score."""
    extractor, f_real = references[primary]
    metrics: dict[str, Any] = {"features": primary, "config": samples.config}
    metrics.update(evaluate_sample_set(samples, f_real, extractor))
    top = {k: metrics[k] for k in ("fd", "kid", "kid_std", "precision", "recall", "confidence") if k in metrics}
    others = {name: ref for name, ref in references.items() if name != primary}
    metrics["spaces"] = {primary: top, **quality_in_spaces(samples.images, others)}  # primary not twice
    if samples.variance is not None and float(samples.variance.max()) > 0 and len(samples.images) >= 10:
        score = samples.score if samples.score is not None else sample_score(samples.images, samples.variance)
        metrics["filtering"] = filtering_in_spaces(samples.images, score, references)
    return metrics


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The metrics as Markdown tables: the headline numbers, one row per feature space, filtering, calibration."""
    columns = [c for c in ("n", "fd", "kid", "precision", "recall", "nfe", "seconds", "samples_per_second", "peak_memory_mb",
                           "fd_drop_uncertain", "fd_drop_random_mean", "spearman_uncertainty_vs_nn_distance",
                           "auroc_worst_20") if c in metrics]
    md = markdown_table([metrics], columns)
    space_rows = [{"features": name, **row} for name, row in metrics["spaces"].items()]
    md += "\n\n" + markdown_table(space_rows, ["features", "fd", "kid", "precision", "recall", "confidence"])
    if "filtering" in metrics:
        md += "\n\nDropping the 20% least certain by the per-sample score vs a random 20% (mean of 5):\n\n"
        filter_rows = [{"features": name, **row} for name, row in metrics["filtering"].items()]
        md += markdown_table(filter_rows, ["features"] + [f"{m}_{w}" for m in ("fd", "precision", "recall", "error")
                                                          for w in ("certain", "random")])
    if "calibration" in metrics:
        md += "\n\n" + markdown_table(metrics["calibration"], ["t", "mse", "z2_total", "z2_aleatoric", "z2_epistemic",
                                                               "nll_total", "mean_var_epistemic"])
    return md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m bdiff.evaluate``: the metrics of ``--samples``, written to ``--out-dir`` and printed."""
    args = parse_args(argv)
    samples = load_samples(args.samples)  # validates shape, range, dtype, keys
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.samples).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = real_data(samples, args.data_ckpt)
    spaces = list(args.features or data.default_spaces)
    if args.train_features_if_missing:
        from bdiff.lit.feature_module import ensure_feature_nets

        ensure_feature_nets([*spaces, args.fallback], data=data)
    metrics = {"samples": str(args.samples),
               **sample_metrics(samples, references_for(spaces, args.fallback, data), spaces[0])}
    if args.ckpt:
        metrics["calibration"] = calibration_report(args.ckpt, out_dir, data)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = metrics_markdown(metrics)
    (out_dir / "metrics.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}")
    if args.wandb_project:
        log_to_wandb(args.wandb_project, metrics, samples.config, out_dir)
    return metrics


if __name__ == "__main__":
    exit_on_user_error(main)
