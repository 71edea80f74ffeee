"""Where a default training step's time goes, and what each speed-up of the default run buys.

    python benchmarks/training_step_cost.py [--config configs/digits.yaml] [--repeats 40] [--rounds 5]

Builds the default DiffusionModule from the config and times, on one batch of the config's size:
the step's forward and backward (Pyro's ELBO through the U-Net) with the U-Net's weights in
PyTorch's default (contiguous) memory order and in channels-last order, each in float32 and
under bf16 autocast (``trainer.precision: bf16-mixed``, the default config's since issue 12's
timing work, with contiguous weights); AdamW's update with the per-parameter, the foreach (multi-tensor) and the
fused implementation; the EMA update with Lightning's per-tensor average (EMAWeightAveraging) and
torch's multi-tensor one (:class:`bdiff.lit.ema.EMA`); the bf16 step with a plain loss on the same network in place
of Pyro's ELBO (what Pyro's tracing costs); with ``--compile``, ``torch.compile`` of the U-Net (its first step, which
compiles, and the compiled step); and the gradient norm that is checked
every step, by Lightning's ``grad_norm`` and by ``torch.nn.utils.get_total_norm``. Milliseconds
per call, median of ``--repeats`` calls after two warm-up calls (the forward/backward: median over
``--rounds`` rounds that alternate the settings). Sampling in both memory orders too: DDIM-10
of 2,000 samples and a training preview's 8-chain uncertainty map of 64 samples (seconds); writes
``benchmarks/results/training_step_cost.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import grad_norm
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from bdiff.bayes import BayesConfig
from bdiff.lit.cli import resolved_config
from bdiff.lit.module import DiffusionModule
from bdiff.nets import UNetConfig
from bdiff.sampling import chain_variance, ddim_sample_and_variance
from bdiff.schedule import ScheduleConfig
from common import RESULTS, ROOT, write_json


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(config: Path) -> tuple[DiffusionModule, int]:
    cfg = resolved_config(config)  # with the code defaults the YAML leaves out
    model = cfg["model"]
    module = DiffusionModule(net=UNetConfig(**model["net"]), bayes=BayesConfig(**model["bayes"]),
                             schedule=ScheduleConfig(**model["schedule"]), num_data=1455)
    return module, int(cfg["data"]["init_args"]["batch_size"])


def sampling_seconds(module: DiffusionModule, rounds: int) -> dict[str, float]:
    """Seconds of DDIM-10 for 2,000 samples (as ``bdiff.sample`` draws) and of a training preview's
    uncertainty map (64 samples, DDIM-50, 8 posterior chains under vmap), per memory order: medians of
    ``rounds`` alternating rounds. Untrained weights: the timing does not depend on their values."""
    denoiser, net = module.denoiser.eval(), module.bayes.net
    x_big, x_grid = torch.randn(2000, *denoiser.image_shape), torch.randn(64, *denoiser.image_shape)
    jobs = {"ddim10_2000": lambda: ddim_sample_and_variance(denoiser, x_big, 10),
            "preview_chains_64": lambda: chain_variance(denoiser.posterior_chains(8), 8, x_grid, 50)}
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for order, memory_format in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            net.to(memory_format=memory_format)
            for job, fn in jobs.items():
                times.setdefault(f"{job}_{order}_s", []).append(milliseconds(fn, 1) / 1e3)
    net.to(memory_format=torch.channels_last)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the forward/backward timing")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the U-Net (inductor, bf16): its compile time and compiled step")
    args = parser.parse_args()
    torch.manual_seed(0)
    module, batch = build(args.config)
    net = module.bayes.net
    x0 = torch.randn(batch, net.config.in_channels, net.config.image_size, net.config.image_size)
    x_t, t, noise = module._noised(x0)

    def step(bf16: bool, plain: bool = False) -> None:
        module.zero_grad()
        # What Lightning's trainer.precision bf16-mixed wraps around the training step.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if plain:  # the same network and gradients' shapes without Pyro's trace: an MSE and a Gaussian NLL
                eps, log_var = net(x_t, t, detach_variance_features=True)
                loss = (eps.float() - noise).square().mean() + (log_var.float() + (noise - eps.detach().float()).square()
                                                                 * torch.exp(-log_var.float())).mean()
            else:
                loss, _ = module.bayes.negative_elbo(x_t, t, noise, 1455, kl_weight=1.0)
        loss.backward()

    # The settings alternate in rounds, so drift of the machine's speed hits all of them alike.
    settings = {"channels_last": (torch.channels_last, False, False),
                "contiguous": (torch.contiguous_format, False, False),
                "bf16_contiguous": (torch.contiguous_format, True, False),
                "bf16_channels_last": (torch.channels_last, True, False),
                "bf16_contiguous_plain_loss": (torch.contiguous_format, True, True)}
    rounds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (memory_format, bf16, plain) in settings.items():
            net.to(memory_format=memory_format)
            rounds[name].append(milliseconds(lambda: step(bf16, plain), args.repeats))
    out: dict[str, float] = {f"forward_backward_{k}": statistics.median(v) for k, v in rounds.items()}
    print("forward/backward per round (ms):", {k: [round(x, 1) for x in v] for k, v in rounds.items()})
    net.to(memory_format=torch.channels_last)
    step(False)  # gradients for the optimizer and the norm
    params = [p for p in module.parameters() if p.requires_grad]
    for name, kwargs in (("per_parameter", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-6, **kwargs)
        out[f"adamw_{name}"] = milliseconds(opt.step, args.repeats)
    for name, kwargs in (("ema_per_tensor", {"avg_fn": get_ema_avg_fn(0.999)}),
                         ("ema_multi_tensor", {"multi_avg_fn": get_ema_multi_avg_fn(0.999)})):
        average = AveragedModel(module, use_buffers=True, **kwargs)
        average.update_parameters(module)  # the first call copies
        out[name] = milliseconds(lambda: average.update_parameters(module), args.repeats)
    grads = lambda: [p.grad for p in module.parameters() if p.grad is not None]  # noqa: E731
    out["grad_norm_lightning"] = milliseconds(lambda: grad_norm(module, 2), args.repeats)
    out["grad_norm_get_total_norm"] = milliseconds(lambda: torch.nn.utils.get_total_norm(grads(), 2.0, foreach=True),
                                                   args.repeats)
    out.update(sampling_seconds(module, args.rounds))
    if args.compile:  # last: compiling changes the module in place
        net.to(memory_format=torch.contiguous_format)
        net.compile()
        start = time.perf_counter()
        step(True)
        out["compile_first_step_s"] = time.perf_counter() - start
        out["forward_backward_bf16_contiguous_compiled"] = milliseconds(lambda: step(True), args.repeats)
    out["threads"] = torch.get_num_threads()
    for key, value in out.items():
        print(f"{key:36s} {value:8.2f}" + ("" if key == "threads" else " s" if key.endswith("_s") else " ms"))
    path = write_json(RESULTS / "training_step_cost.json",
                      {"config": str(args.config), "batch": batch, **out, "rounds_ms": rounds})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
