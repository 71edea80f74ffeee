"""Build the model from its configs and restore it from a checkpoint, without Lightning.

A bdiff checkpoint is a Lightning checkpoint whose ``hyper_parameters`` hold
plain dicts (``net``, ``bayes``, ``schedule``) and whose ``state_dict`` holds the
``denoiser.*`` tensors (U-Net, prior buffers, guide locs/scales, schedule). With
EMA on, ``state_dict`` holds the averaged weights (Lightning's
``EMAWeightAveraging`` writes them there). Checkpoints are read with
``torch.load(weights_only=True)``: a file carrying arbitrary pickled objects is
refused, never executed.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from bdiff.bayes import BayesConfig, BayesianUNet, posterior_loc_scale
from bdiff.bayes.bottleneck_gp import restore as restore_gp
from bdiff.bayes.error_scale import EpistemicErrorScale
from bdiff.bayes.predictive import BayesianDenoiser
from bdiff.bayes.prior_fusion import PriorWeight
from bdiff.bayes.recalibration import VarianceCalibration
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.nets import UNet, UNetConfig
from bdiff.schedule import NoiseSchedule, ScheduleConfig

PREFIX = "denoiser."
MODEL_PREFIX = PREFIX + "model."  # the BayesianUNet's keys in a checkpoint's state_dict


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a bdiff checkpoint dict safely (weights only), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for bad files
        raise ValueError(
            f"cannot read checkpoint {str(path)!r}: it is truncated, corrupt, or carries pickled objects "
            f"that weights-only loading refuses ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if not isinstance(ckpt, dict) or not {"hyper_parameters", "state_dict"} <= ckpt.keys():
        raise ValueError(f"{str(path)!r} is not a bdiff checkpoint (no hyper_parameters/state_dict)")
    hp = ckpt["hyper_parameters"]
    if not {"net", "bayes", "schedule"} <= set(hp):
        raise ValueError(f"{str(path)!r} is not a bdiff checkpoint (hyper_parameters lack net/bayes/schedule)")
    return ckpt


def build_denoiser(
    net: UNetConfig,
    bayes: BayesConfig,
    schedule: ScheduleConfig,
    warm_start: str | Path | None = None,
) -> BayesianDenoiser:
    """The whole model from its configs. ``warm_start``: a checkpoint whose U-Net weights are the init."""
    unet = UNet(net)
    if warm_start:
        load_net_weights(unet, warm_start)
    return BayesianDenoiser(BayesianUNet(unet, bayes), NoiseSchedule(**asdict(schedule)))


def _net_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """U-Net weights of a checkpoint; Bayesian ones replaced by their posterior means."""
    state = ckpt["state_dict"]
    net_prefix = MODEL_PREFIX + "net."
    out = {k[len(net_prefix) :]: v for k, v in state.items() if k.startswith(net_prefix)}
    out.update({name: loc for name, (loc, _) in posterior_loc_scale(state, MODEL_PREFIX).items()})
    return out


def load_net_weights(net: UNet, path: str | Path) -> None:
    """Copy a checkpoint's U-Net weights (posterior means for Bayesian ones) into ``net`` (warm start)."""
    ckpt = read_checkpoint(path)
    saved = ckpt["hyper_parameters"]["net"]
    if plain_config(saved) != plain_config(asdict(net.config)):
        raise ValueError(
            f"warm-start checkpoint {str(path)!r} has net={saved}, which differs from this model's "
            f"net={asdict(net.config)}; warm-start needs the same U-Net"
        )
    net.load_state_dict(_net_state(ckpt))


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    num_samples: int | None = None,
    weights: str = "average",
) -> BayesianDenoiser:
    """Restore a trained :class:`BayesianDenoiser` from a checkpoint, in eval mode.

    Args:
        path: a checkpoint written by ``train.py`` (``last.ckpt`` or a best one).
        map_location: device to load onto, e.g. ``"cuda"``.
        num_samples: K weight samples per prediction (default: the trained config's).
        weights: ``"average"`` (default): the weights the checkpoint ships, i.e. the EMA average
            when the run had the EMA callback (Lightning swaps it into ``state_dict``);
            ``"current"``: the optimizer's own weights at that step (Lightning's
            ``current_model_state``; the same as ``"average"`` for a run without EMA). The
            variance calibration and the bottleneck GP were fitted with the averaged weights.

    Example:
        >>> from bdiff import load_model
        >>> den = load_model("runs/digits/checkpoints/last.ckpt")
        >>> pred = den.predict(x_t, t)
    """
    if weights not in ("average", "current"):
        raise ValueError(f"weights must be 'average' (the EMA weights a checkpoint ships) or 'current', got {weights!r}")
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    net = UNetConfig(**hp["net"])
    net.channel_mults, net.attention_resolutions = tuple(net.channel_mults), tuple(net.attention_resolutions)
    denoiser = build_denoiser(net, BayesConfig(**hp["bayes"]), ScheduleConfig(**hp["schedule"]))
    if num_samples is not None:
        denoiser.num_samples = num_samples
    saved = ckpt.get("current_model_state", ckpt["state_dict"]) if weights == "current" else ckpt["state_dict"]
    state = {k[len(PREFIX) :]: v for k, v in saved.items() if k.startswith(PREFIX)}
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match the architecture in its own config: {e}") from e
    if "variance_calibration" in ckpt:  # absent in older checkpoints and with model.variance_calibration_knots: 0
        denoiser.calibration = VarianceCalibration.from_dict(ckpt["variance_calibration"])
    if "bottleneck_gp" in ckpt:  # trained with model.epistemic_gp: true
        denoiser.epistemic_gp = restore_gp(ckpt["bottleneck_gp"])
    if "epistemic_error_scale" in ckpt:  # absent in older checkpoints: python -m bdiff.recalibrate adds it
        denoiser.error_scale = EpistemicErrorScale.from_dict(ckpt["epistemic_error_scale"])
    if "gaussian_prior" in ckpt and "prior_weight" in ckpt:  # absent in older checkpoints: bdiff.recalibrate adds them
        denoiser.prior = GaussianDenoiser.from_dict(ckpt["gaussian_prior"], denoiser.schedule).to(map_location)
        denoiser.prior_weight = PriorWeight.from_dict(ckpt["prior_weight"])
    return denoiser.to(map_location).eval().requires_grad_(False)


def plain_config(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists: configs from YAML and from code compare equal."""
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


def datamodule_of(ckpt: dict[str, Any]) -> Any:
    """The checkpoint's LightningDataModule, rebuilt from the class path and options LightningCLI saved."""
    hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise ValueError("the checkpoint records no datamodule, so its training and held-out images are unknown: pass "
                         "a checkpoint that train.py (LightningCLI) wrote, such as the run's last.ckpt")
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**hp)
