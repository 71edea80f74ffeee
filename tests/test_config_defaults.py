"""One source of defaults: every shipped training config resolves to the measured-best settings.

The settings live in the code (``BayesConfig``, ``DiffusionModule``, ``bdiff.lit.cli.TRAINER_DEFAULTS``);
a config under ``configs/`` may depart from them only where :data:`DEPARTURES` says why, and then with
a comment on that line of the YAML.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from bdiff.lit.cli import resolved_config
from tests.conftest import CONFIGS

#: dotted key -> the measured-best value (docs/training.md; BENCHMARKS.md, "Held-out digit class")
MEASURED_BEST: dict[str, Any] = {
    "model.bayes.objective": "hybrid",
    "model.bayes.mean_likelihood_var": 0.075,
    "model.epistemic_gp": True,
    "model.lr_decay": "cosine",
    "trainer.precision": "bf16-mixed",
}

#: config -> {key: (its value, why)}
DEPARTURES: dict[str, dict[str, tuple[Any, str]]] = {
    "digits_ddpm.yaml": {
        "model.bayes.objective": ("mse", "the plain-DDPM baseline (Ho et al. 2020) the default model is measured against"),
        "model.epistemic_gp": (False, "a deterministic U-Net: no uncertainty to measure"),
    },
    "photos32_ddpm.yaml": {
        "model.bayes.objective": ("mse", "the plain-DDPM baseline the photos model is measured against"),
        "model.epistemic_gp": (False, "a deterministic U-Net: no uncertainty to measure"),
    },
    "digits_guide.yaml": {
        "model.bayes.objective": ("mse", "autoguidance's deliberately weaker plain DDPM"),
        "model.epistemic_gp": (False, "a deterministic U-Net: no uncertainty to measure"),
    },
    "debug.yaml": {
        "trainer.precision": ("32-true", "the smoke config: tests compare its runs bit for bit on any CPU"),
        "model.epistemic_gp": (False, "the smoke config: the GP's fit would outlast its 30 steps"),
    },
}

TRAINING_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))  # not critic/, features/, sampler/


def get(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def yaml_lines(config: str, key: str) -> list[str]:
    """The lines of the YAML file that set ``key`` (matched by its last part under its first)."""
    last = key.rsplit(".", 1)[-1]
    return [line for line in (CONFIGS / config).read_text().splitlines() if line.strip().startswith(f"{last}:")]


def test_every_training_config_is_checked() -> None:
    assert {"digits.yaml", "digits_ddpm.yaml", "digits_guide.yaml", "debug.yaml", "mnist.yaml", "cifar10.yaml",
            "image_folder.yaml", "photos32.yaml", "photos32_ddpm.yaml"} <= set(TRAINING_CONFIGS)
    assert set(DEPARTURES) <= set(TRAINING_CONFIGS)


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_config_resolves_to_the_measured_best_settings(config: str) -> None:
    resolved = resolved_config(CONFIGS / config)
    raw = yaml.safe_load((CONFIGS / config).read_text())
    departures = DEPARTURES.get(config, {})
    for key, best in MEASURED_BEST.items():
        if key in departures:
            value, why = departures[key]
            assert get(resolved, key) == value != best, (config, key, why)
            assert any("#" in line for line in yaml_lines(config, key)), f"{config}: say why {key} is {value}"
        else:
            assert get(resolved, key) == best, (config, key)
            with pytest.raises(KeyError):  # inherited from the code, not restated (it would drift)
                get(raw, key)


@pytest.mark.parametrize("config", [c for c in TRAINING_CONFIGS if c != "debug.yaml"])
def test_validation_cadence_is_counted_in_steps(config: str) -> None:
    trainer = resolved_config(CONFIGS / config)["trainer"]
    assert trainer["check_val_every_n_epoch"] is None and isinstance(trainer["val_check_interval"], int), config
    assert 0 < trainer["val_check_interval"] <= trainer["max_steps"], config  # FinalValidation adds the last one


def test_resolved_config_applies_overrides_and_seeds_nothing() -> None:
    import torch

    state = torch.get_rng_state()
    config = resolved_config(CONFIGS / "digits.yaml", "--model.lr_decay=none", "--trainer.precision=32-true")
    assert config["model"]["lr_decay"] == "none" and config["trainer"]["precision"] == "32-true"
    assert torch.equal(torch.get_rng_state(), state)


#: config -> why its weight average may still hold more than 1% of the random initial weights at max_steps
EMA_LEFT_AT_INIT: dict[str, str] = {
    "digits_guide.yaml": "autoguidance's deliberately weaker network",
    "debug.yaml": "the smoke config: 30 steps",
}


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_the_weight_average_has_forgotten_the_initial_weights(config: str) -> None:
    """A constant EMA decay keeps decay**max_steps of the random init in the weights a checkpoint ships; at 5% (0.999
    over 3,000 steps) samples drift to saturated noise. A config keeps it under 1% or uses EDM2's sigma_rel."""
    trainer = resolved_config(CONFIGS / config)["trainer"]
    emas = [cb.get("init_args") or {} for cb in trainer.get("callbacks") or []
            if str(cb.get("class_path", "")).endswith(".EMA")]
    assert emas, f"{config}: every shipped training config averages its weights"
    for args in emas:
        if args.get("sigma_rel") is not None or config in EMA_LEFT_AT_INIT:
            continue
        left = float(args.get("decay", 0.999)) ** trainer["max_steps"]
        assert left < 0.01, f"{config}: EMA decay {args.get('decay')} keeps {left:.1%} of the initial weights"
