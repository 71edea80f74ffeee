"""Which parameters of a network carry a weight posterior.

A selection is a preset name or a list of glob patterns over parameter names
(``net.named_parameters()``). Normalisation layers and the time-embedding MLP
always stay deterministic (Pyro field notes: making them Bayesian destabilises
training and buys little).
"""

from __future__ import annotations

import fnmatch
import math

from torch import nn

PRESETS: dict[str, list[str]] = {
    "none": [],
    "head": ["head.*"],
    "decoder": ["up.*", "head.*"],
    "all": ["*"],
}
ALWAYS_DETERMINISTIC = ["time_embed.*"]


def _norm_parameter_names(net: nn.Module) -> set[str]:
    names = set()
    for module_name, module in net.named_modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def select_parameters(net: nn.Module, layers: str | list[str]) -> list[str]:
    """Names of the parameters of ``net`` chosen by ``layers``, in ``named_parameters`` order.

    Args:
        layers: a preset (``none``, ``head``, ``decoder``, ``all``) or a list of
            glob patterns such as ``["up.3.*", "head.weight"]``.

    Raises:
        ValueError: unknown preset, or a pattern that selects no parameter.
    """
    if isinstance(layers, str):
        if layers not in PRESETS:
            raise ValueError(
                f"bayes.layers={layers!r} is not a preset {sorted(PRESETS)}; "
                "give one of those or a list of glob patterns over parameter names"
            )
        patterns = PRESETS[layers]
    else:
        patterns = list(layers)
    excluded = _norm_parameter_names(net)
    candidates = [
        name
        for name, _ in net.named_parameters()
        if name not in excluded and not any(fnmatch.fnmatchcase(name, p) for p in ALWAYS_DETERMINISTIC)
    ]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ValueError(
                f"bayes.layers pattern {pattern!r} matches no parameter that may be Bayesian; "
                f"examples of names: {candidates[:3]} ... {candidates[-2:]}"
            )
    return [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def fan_in_std(net: nn.Module, name: str) -> float:
    """1/sqrt(fan_in) of the layer that owns parameter ``name`` (bias: its weight's fan-in)."""
    params = dict(net.named_parameters())
    weight = params.get(name.rsplit(".", 1)[0] + ".weight", params[name])
    fan_in = weight[0].numel() if weight.dim() > 1 else 1
    return 1.0 / math.sqrt(fan_in)


def site_name(parameter_name: str) -> str:
    """Pyro sample-site / attribute name for a dotted parameter name (``up.0.conv1.weight`` -> ``up__0__conv1__weight``)."""
    return parameter_name.replace(".", "__")



def parameter_name(site: str) -> str:
    """Inverse of :func:`site_name` (``up__0__conv1__weight`` -> ``up.0.conv1.weight``)."""
    return site.replace("__", ".")
