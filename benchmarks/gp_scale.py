"""What the bottleneck GP costs a user with a big dataset: fit time and memory, query cost, sampling memory.

    python benchmarks/gp_scale.py [--config configs/photos32.yaml] [--sizes 2048 10000 50000] [--device cpu]

A training run fits the GP (:mod:`bdiff.bayes.bottleneck_gp`) at every validation: on the first
512 training images with one noising per t-knot, and at the fit's last validation on the first
2,048 (:attr:`bdiff.lit.module.DiffusionModule.EPISTEMIC_GP_IMAGES`) with three. Those caps make
its cost independent of the dataset's size; this benchmark measures that. For each size N of a
synthetic dataset of N random 3x32x32 images (``--sizes``; 50,000 is CIFAR-10's training set),
a fresh process builds the config's network (random weights: the cost does not depend on them),
holds the N images in memory as a dataset and runs, as :class:`~bdiff.lit.module.DiffusionModule`
does, ``_training_images`` (the first min(N, cap) images) and ``BottleneckGP.fit``:

* ``fit_s``: the final fit (2,048 images x 3 noisings x 20 knots) and ``fit_every_val_s`` (512 x 1);
* ``peak_mib``: the process's peak resident set (``os.wait4``), and ``data_mib`` the dataset's own share;
* ``query_vs_forward``: one ``predict`` of 256 images with the GP over one deterministic forward
  of the network (interleaved medians, ``benchmarks/timing.py``);
* ``sampling_peak_mib`` (largest N only): 2,000 samples of UniPC at 10 steps in chunks of 500,
  with the GP's variance propagated, in another fresh process.

With ``--device cuda`` the same runs on a GPU (peak memory then from ``torch.cuda.max_memory_allocated``).
Writes ``benchmarks/results/gp_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, write_results


def build(config: Path, device: str):
    """The config's DiffusionModule (random weights) on ``device``, in eval mode."""
    import torch

    from bdiff.bayes import BayesConfig
    from bdiff.lit.cli import resolved_config
    from bdiff.lit.module import DiffusionModule
    from bdiff.nets import UNetConfig

    model = resolved_config(config)["model"]
    net = {**model["net"], "channel_mults": tuple(model["net"]["channel_mults"]),
           "attention_resolutions": tuple(model["net"]["attention_resolutions"])}
    torch.manual_seed(0)
    module = DiffusionModule(net=UNetConfig(**net), bayes=BayesConfig(**model["bayes"]), num_data=50_000)
    return module.to(device).eval()


def peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_fit(config: Path, n: int, device: str) -> dict:
    """One size: hold N images, fit the GP as a run's validations do; time, memory and the query cost."""
    import torch
    from timing import interleaved_medians
    from torch.utils.data import TensorDataset

    from bdiff.bayes.bottleneck_gp import BottleneckGP

    module = build(config, device)
    base = peak_mib(device)
    shape = (module.bayes.net.config.in_channels, module.bayes.net.config.image_size, module.bayes.net.config.image_size)
    data = TensorDataset(torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    data_mib = data.tensors[0].numel() * 4 / 2**20
    first = lambda limit: list(torch.stack([data[i][0] for i in range(min(n, limit))]).to(device).split(256))
    with torch.no_grad():
        start = time.perf_counter()
        BottleneckGP.fit(module.bayes, module.schedule, first(512), draws=1)
        every_val = time.perf_counter() - start
        start = time.perf_counter()
        gp = BottleneckGP.fit(module.bayes, module.schedule, first(module.EPISTEMIC_GP_IMAGES), draws=3)
        final = time.perf_counter() - start
        module.denoiser.epistemic_gp = gp
        x_t = torch.randn(256, *shape, device=device)
        t = torch.randint(0, 1000, (256,), device=device)
        med = interleaved_medians({"forward": lambda: module.bayes.net(x_t, t),
                                   "predict": lambda: module.denoiser.predict(x_t, t)}, 7)
    return {"n": n, "fit_s": final, "fit_every_val_s": every_val, "peak_mib": peak_mib(device),
            "model_mib": base, "data_mib": data_mib, "query_vs_forward": med["predict"] / med["forward"]}


def child_sample(config: Path, device: str) -> dict:
    """2,000 samples, UniPC 10 steps, chunks of 500, with the GP fitted on 2,048 random images: peak memory."""
    import torch

    from bdiff.bayes.bottleneck_gp import BottleneckGP
    from bdiff.sampling.sampler import Sampler
    from bdiff.sampling.unipc import UniPC

    module = build(config, device)
    cfg = module.bayes.net.config
    images = (torch.rand(2048, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1).to(device)
    with torch.no_grad():
        module.denoiser.epistemic_gp = BottleneckGP.fit(module.bayes, module.schedule, list(images.split(256)), draws=1)
        del images
        start = time.perf_counter()
        sampler = Sampler(module.denoiser, UniPC(), 10)
        total = sum(r.images.shape[0] for _, r in sampler.sample_chunks(2000, 500, seed=0, device=device))
    return {"samples": total, "sampling_s": time.perf_counter() - start, "sampling_peak_mib": peak_mib(device)}


def run_child(args: list[str]) -> dict:
    """Run this script's ``--child`` mode in a fresh process; its JSON line."""
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "photos32.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 10_000, 50_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stem", default="gp_scale")
    parser.add_argument("--child", choices=("fit", "sample"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "fit":
        print(json.dumps(child_fit(args.config, args.n, args.device)))
        return
    if args.child == "sample":
        print(json.dumps(child_sample(args.config, args.device)))
        return
    common = ["--config", str(args.config), "--device", args.device]
    rows = []
    for n in args.sizes:
        rows.append(run_child(["--child", "fit", "--n", str(n), *common]))
        print(rows[-1], flush=True)
    rows[-1].update(run_child(["--child", "sample", *common]))
    payload = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
               "device": args.device, "cpu": platform.processor() or platform.machine(), "rows": rows}
    write_results(RESULTS, args.stem, payload, rows, ["n", "data_mib", "model_mib", "peak_mib", "fit_s", "fit_every_val_s",
                                                      "query_vs_forward", "sampling_s", "sampling_peak_mib"])


if __name__ == "__main__":
    main()
