"""Training steps that give a U-Net variant the default run's wall time (issue 12: model size at equal time).

    python benchmarks/equal_time_steps.py --variant noattn:attention_resolutions=[] \
        b24:base_channels=24 b24noattn:base_channels=24,attention_resolutions=[] \
        [--config configs/digits.yaml] [--rounds 30] [--out benchmarks/results/equal_time_steps.json]
    # the plain-DDPM baseline of the photos (configs/photos32_ddpm.yaml's model)
    python benchmarks/equal_time_steps.py --config configs/photos32.yaml --rounds 15 \
        --variant ddpm:bayes.layers=none,bayes.objective=mse --out benchmarks/results/equal_time_steps_photos32.json

Each variant is the default config's model (configs/digits.yaml: objective, Bayesian head, EMA,
precision) with some ``model.net`` fields (or, prefixed ``bayes.``, ``model.bayes`` fields) overridden. One training step of each -- noising,
Pyro's ELBO under the config's bf16 autocast, backward, gradient clipping, AdamW, the EMA's
multi-tensor update; what ``DiffusionModule.training_step`` and the callbacks do per step, minus
logging -- is timed on one batch of the config's size, every variant once per round
(``benchmarks/timing.py``). The equal-time steps of a variant are the default's
``trainer.max_steps`` times the default step's median over the variant's. Lightning's own
per-step overhead (validation, logging, the data loader: not timed here) is then paid on more
steps, so a faster variant's fit takes longer than the default's (up to ~1.3x for the 24-channel
attention-free U-Net); the whole runs' wall times are measured by ``time``
(BENCHMARKS.md, "Denoiser vs a plain DDPM"; docs/training.md). Writes ``--out``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import yaml
from bayes_overhead import train_step_fn
from common import RESULTS, ROOT, write_json
from timing import interleaved_medians

from bdiff.bayes import BayesConfig
from bdiff.lit.cli import resolved_config
from bdiff.lit.module import DiffusionModule
from bdiff.nets import UNetConfig


def parse_variant(item: str) -> tuple[str, dict]:
    """``name:field=value,field=value`` (values in YAML, lists without commas inside) -> (name, overrides)."""
    name, sep, spec = item.partition(":")
    if not sep or not name:
        raise SystemExit(f"error: --variant takes name:field=value[,field=value], got {item!r}")
    fields = [*UNetConfig.__dataclass_fields__, *(f"bayes.{f}" for f in BayesConfig.__dataclass_fields__)]
    overrides = {}
    for pair in spec.split(","):
        key, eq, value = pair.partition("=")
        if not eq or key not in fields:
            raise SystemExit(f"error: {pair!r} in --variant {item!r}: use field=value with a UNetConfig field or "
                             f"bayes.<BayesConfig field> ({', '.join(fields)})")
        v = yaml.safe_load(value)
        overrides[key] = tuple(v) if isinstance(v, list) else v
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", required=True, help="name:field=value[,field=value] (UNetConfig fields)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (benchmarks/timing.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "equal_time_steps.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolved_config(args.config)  # with the code defaults the YAML leaves out
    model, trainer = cfg["model"], cfg["trainer"]
    decay = next(c["init_args"]["decay"] for c in trainer["callbacks"] if c["class_path"].endswith(".EMA"))
    net = {**model["net"], "channel_mults": tuple(model["net"]["channel_mults"]),
           "attention_resolutions": tuple(model["net"]["attention_resolutions"])}
    variants = {"default": {}, **dict(parse_variant(v) for v in args.variant)}
    x0 = torch.rand(cfg["data"]["init_args"]["batch_size"], net["in_channels"], net["image_size"], net["image_size"]) * 2 - 1
    fns, params = {}, {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        net_fields = {k: v for k, v in overrides.items() if not k.startswith("bayes.")}
        bayes = {**model["bayes"], **{k[len("bayes."):]: v for k, v in overrides.items() if k.startswith("bayes.")}}
        module = DiffusionModule(net=UNetConfig(**{**net, **net_fields}), bayes=BayesConfig(**bayes), num_data=1617)
        params[name] = sum(p.numel() for p in module.parameters())
        fns[name] = train_step_fn(module, x0, trainer["precision"], lr=model["lr"], clip=trainer["gradient_clip_val"], ema_decay=decay)
    sec = interleaved_medians(fns, args.rounds)
    steps = trainer["max_steps"]
    rows = [{"variant": name, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in variants[name].items()},
             "params": params[name], "step_ms": 1e3 * sec[name], "step_ratio": sec[name] / sec["default"],
             "equal_time_steps": int(round(steps * sec["default"] / sec[name], -1))} for name in variants]
    for r in rows:
        print(f"{r['variant']:12s} {r['params']:9d} params  {r['step_ms']:6.1f} ms/step  "
              f"{r['step_ratio']:.2f}x  equal-time steps {r['equal_time_steps']}")
    config = str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config)
    write_json(args.out, {"config": config, "default_steps": steps, "precision": trainer["precision"],
                          "rounds": args.rounds, "threads": args.threads,
                          "cpu": platform.processor() or platform.machine(), "rows": rows})


if __name__ == "__main__":
    main()
