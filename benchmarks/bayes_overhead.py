"""What Bayes costs: training step and posterior predictive vs the deterministic U-Net.

Targets (issue 2), on the default digits model (configs/digits.yaml), CPU:
  * a Bayesian training step <= 1.3x a deterministic step (same U-Net, same batch);
  * a K=8 posterior-predictive call <= 1.3x one deterministic forward pass.

Both sides run the real code: the training step is noising + ``negative_elbo``
(Pyro TraceMeanField_ELBO) + backward + AdamW, exactly what
``DiffusionModule.training_step`` does minus logging; the deterministic side is
the same module with ``bayes.layers: none``. The training step runs under the default
config's ``trainer.precision`` (``--precision``; bf16 autocast for ``bf16-mixed``, as Lightning's
CPU bf16 plugin does); predictions run in float32, as sampling does. Timing: every step and predict once per
round, ``--rounds`` rounds, medians (``benchmarks/timing.py``), 2 threads.

    python benchmarks/bayes_overhead.py [--batch 128] [--layers head decoder all] [--precision bf16-mixed] [--out benchmarks/results/bayes_overhead.json]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from bdiff.bayes import BayesConfig
from bdiff.bayes.predictive import draw_weights, predict_with_weights
from bdiff.lit.cli import resolved_config
from bdiff.lit.module import DiffusionModule
from bdiff.nets import UNetConfig
from common import RESULTS, ROOT, write_json
from timing import interleaved_medians


def default_config() -> dict:
    return resolved_config(ROOT / "configs" / "digits.yaml")  # with the code defaults the YAML leaves out


def default_model_args() -> dict:
    cfg = default_config()["model"]
    net = cfg["net"]
    net["channel_mults"], net["attention_resolutions"] = tuple(net["channel_mults"]), tuple(net["attention_resolutions"])
    return cfg


def build(layers: str, cfg: dict) -> DiffusionModule:
    torch.manual_seed(0)
    bayes = {**cfg["bayes"], "layers": layers}
    # no bottleneck GP: it needs a point trunk, and nothing is fitted here
    return DiffusionModule(net=UNetConfig(**cfg["net"]), bayes=BayesConfig(**bayes), num_data=1617, epistemic_gp=False)


def predict_fn(module: DiffusionModule, predict):
    """``predict()`` in eval mode without autograd, as sampling calls it."""

    def run() -> None:
        module.eval()
        with torch.no_grad():
            predict()

    return run


def train_step_fn(module: DiffusionModule, x0: torch.Tensor, precision: str, lr: float = 1e-4,
                  clip: float | None = None, ema_decay: float | None = None):
    """One optimizer step (noising, ELBO, backward, AdamW), optionally with gradient clipping and the EMA's
    multi-tensor update as the configs' fit does them; returns the closure."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    bf16 = precision == "bf16-mixed"
    ema = [p.detach().clone() for p in params] if ema_decay is not None else None
    ema_update = get_ema_multi_avg_fn(ema_decay) if ema_decay is not None else None

    def step() -> None:
        module.train()
        x_t, t, noise = module._noised(x0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.bayes.negative_elbo(x_t, t, noise, module.num_data).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if ema_update is not None:
            ema_update(ema, [p.detach() for p in params], 1)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layers", nargs="+", default=["head", "decoder", "all"])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (benchmarks/timing.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default=str(default_config()["trainer"]["precision"]),
                        help="of the training step (default: configs/digits.yaml's trainer.precision)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bayes_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = default_model_args()
    x0 = torch.rand(args.batch, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 1000, (args.batch,))

    det = build("none", cfg)
    fns = {"det_step": train_step_fn(det, x0, args.precision), "det_forward": predict_fn(det, lambda: det.bayes.net(x0, t))}
    modules = {}
    for layers in args.layers:
        mod = modules[layers] = build(layers, cfg)
        den = mod.denoiser
        den.num_samples = args.k
        fns[f"{layers}/step"] = train_step_fn(mod, x0, args.precision)
        fns[f"{layers}/sampled"] = predict_fn(mod, lambda den=den: predict_with_weights(den.model, x0, t, draw_weights(den.model, args.k)))
        fns[f"{layers}/default"] = predict_fn(mod, lambda den=den: den.predict(x0, t))
    sec = interleaved_medians(fns, args.rounds)
    det_step, det_fwd = sec["det_step"], sec["det_forward"]
    rows = []
    for layers, mod in modules.items():
        den = mod.denoiser
        mode = "analytic" if den.mode == "analytic" or (den.mode == "auto" and layers == "head") else "sampled"
        rows.append(
            {
                "layers": layers,
                "bayesian_params": sum(p.numel() for n, p in den.model.net.named_parameters() if n in den.model.bayesian_names),
                "train_step_s": sec[f"{layers}/step"],
                "train_step_ratio": sec[f"{layers}/step"] / det_step,
                "predict_default_mode": mode,
                "predict_default_s": sec[f"{layers}/default"],
                "predict_default_ratio": sec[f"{layers}/default"] / det_fwd,
                f"predict_sampled_k{args.k}_s": sec[f"{layers}/sampled"],
                f"predict_sampled_k{args.k}_ratio": sec[f"{layers}/sampled"] / det_fwd,
            }
        )
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "k": args.k,
        "rounds": args.rounds,
        "precision": args.precision,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "deterministic_train_step_s": det_step,
        "deterministic_forward_s": det_fwd,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"deterministic: train step {det_step * 1e3:.1f} ms, forward {det_fwd * 1e3:.1f} ms (batch {args.batch})")
    print("| Bayesian layers | Bayesian params | train step | vs det. | predict (default) | vs det. fwd | "
          f"predict K={args.k} sampled | vs det. fwd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['bayesian_params']:,} | {r['train_step_s'] * 1e3:.1f} ms | {r['train_step_ratio']:.2f}x | "
            f"{r['predict_default_s'] * 1e3:.1f} ms ({r['predict_default_mode']}) | {r['predict_default_ratio']:.2f}x | "
            f"{r[f'predict_sampled_k{args.k}_s'] * 1e3:.1f} ms | {r[f'predict_sampled_k{args.k}_ratio']:.2f}x |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
