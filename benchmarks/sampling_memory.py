"""Peak memory of ``python -m bdiff.sample`` against N (issue 7: flat, no growth with N).

    python benchmarks/sampling_memory.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt

For each N in 1,000 / 5,000 / 20,000 a fresh process runs the real CLI with a cheap recipe
(DDIM, 5 steps, K=8 weight samples, plus a Recorder keeping x, x0 and var of every sample of
the chunk at every step) in chunks of ``--batch-size`` 500. Its peak resident set size comes
from the kernel for that process alone (``os.wait4`` -> ``ru_maxrss``), so it includes
imports, the model, the per-chunk working set and the final ``.npz`` assembly. A first row
(N=0) only imports ``bdiff.sample`` and loads the model: the floor under every run. A thread
in the child also samples its resident set every 0.1 s: ``rss_mid_mib`` and
``rss_last_quarter_mib`` are its medians over the middle half and the last quarter of the run
(upward drift while chunks go by shows as last quarter > middle).

Each N runs ``--repeats`` times (default 3): the peak of one N varies by about +-15 MiB
between identical runs (where the allocator happens to place the chunk buffers of two
threads), so the table shows the median and the range.

On the digits checkpoint (8x8) all 20,000 samples take only 10 MiB, within that noise, so
the same runs are repeated on an untrained 3x32x32 model (``--synthetic``, on by default;
DDIM 2 steps, K=1, one run per N) whose 20,000 samples take 469 MiB: there, holding the
whole result in memory shows plainly.

``--baseline-src DIR`` also measures another checkout (e.g. the code before streaming:
``mkdir /tmp/before && git archive 68bb23e | tar -x -C /tmp/before``), run the same way.
Wall times are medians on whatever else the machine runs (not the point here). Writes
``benchmarks/results/sampling_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import RESULTS, ROOT, write_results

RECORDER = "callbacks:\n  - {name: recorder, keys: [x, x0, var], every: 1, max_records: 100, max_samples: 500}\n"
RECIPE = "stepper: {name: ddim, eta: 0.0}\nsteps: 5\nposterior_samples: 8\n" + RECORDER
SYNTHETIC_RECIPE = "stepper: {name: ddim, eta: 0.0}\nsteps: 2\nposterior_samples: 1\n" + RECORDER
# Runs the CLI as ``python -m bdiff.sample`` would, sampling this process's resident set every 0.1 s.
WATCHED = """
import json, os, runpy, sys, threading, time
trace, page, rss = sys.argv.pop(1), os.sysconf("SC_PAGE_SIZE"), []
def watch():
    while True:
        rss.append(int(open("/proc/self/statm").read().split()[1]) * page / 2**20)
        time.sleep(0.1)
threading.Thread(target=watch, daemon=True).start()
try:
    runpy.run_module("bdiff.sample", run_name="__main__", alter_sys=True)
finally:
    open(trace, "w").write(json.dumps(rss))
"""
LOAD_ONLY = "import sys, bdiff.sample; from bdiff.checkpoint import load_model; load_model(sys.argv[1], num_samples=8)"


def synthetic_checkpoint(path: Path) -> Path:
    """An untrained 3x32x32 Bayesian U-Net (8 base channels), saved as a bdiff checkpoint."""
    import torch

    from bdiff.bayes import BayesConfig
    from bdiff.checkpoint import build_denoiser
    from bdiff.nets import UNetConfig
    from bdiff.schedule import ScheduleConfig

    net = UNetConfig(image_size=32, in_channels=3, base_channels=8, num_heads=2, attention_resolutions=())
    configs = {"net": net, "bayes": BayesConfig(), "schedule": ScheduleConfig()}
    torch.manual_seed(0)
    den = build_denoiser(**configs)
    state = {"denoiser." + k: v for k, v in den.state_dict().items()}
    torch.save({"hyper_parameters": {k: asdict(v) for k, v in configs.items()}, "state_dict": state}, path)
    return path


def peak_rss_mib(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh process; its own peak RSS (MiB), wall seconds and stdout."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start, stdout  # KiB on Linux


def repeated(cmd: list[str], src: Path, repeats: int, trace: Path | None = None) -> dict:
    """Peak RSS median/min/max (MiB) and median wall seconds over ``repeats`` fresh processes.

    With ``trace`` (a WATCHED run writes its RSS series there): also the median RSS over the
    middle half of each run and over its last quarter (medians over runs), i.e. whether the
    resident set drifts upwards while chunks go by.
    """
    runs, mid, late = [], [], []
    for _ in range(repeats):
        runs.append(peak_rss_mib(cmd, src)[:2])
        if trace is not None:
            series = json.loads(trace.read_text())
            mid.append(statistics.median(series[len(series) // 4 : 3 * len(series) // 4] or series))
            late.append(statistics.median(series[3 * len(series) // 4 :] or series))
    rss = sorted(r for r, _ in runs)
    out = {"peak_rss_mib": statistics.median(rss), "rss_min_mib": rss[0], "rss_max_mib": rss[-1],
           "wall_s": statistics.median(s for _, s in runs), "runs_rss_mib": rss}
    if trace is not None:
        out.update(rss_mid_mib=statistics.median(mid), rss_last_quarter_mib=statistics.median(late))
    return out


def measure(src: Path, label: str, ckpt: str, recipe_text: str, sizes: list[int], batch: int, repeats: int,
            work: Path, model: str) -> list[dict]:
    recipe = work / f"{model}.yaml"
    recipe.write_text(recipe_text)
    rows = [{"model": model, "code": label, "n": 0, **repeated([sys.executable, "-c", LOAD_ONLY, ckpt], src, repeats),
             "note": "import + load model only"}]
    for n in sizes:
        out = work / f"{label}_{n}.npz"
        trace = work / "rss.json"
        cmd = [sys.executable, "-c", WATCHED, str(trace), "--ckpt", ckpt, "--config", str(recipe), "--n", str(n),
               "--batch-size", str(batch), "--out", str(out)]
        row = {"model": model, "code": label, "n": n, **repeated(cmd, src, repeats, trace), "file_mib": out.stat().st_size / 2**20,
               "note": f"--batch-size {batch}"}
        rows.append(row)
        print(f"{model}, {label}, N={n}: peak RSS {row['runs_rss_mib']} MiB, {row['wall_s']:.0f} s", flush=True)
        out.unlink()
    floor = rows[1]["peak_rss_mib"]
    for r in rows[1:]:
        r["growth_vs_first_mib"] = r["peak_rss_mib"] - floor
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per N")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure an untrained 3x32x32 model (one run per N)")
    p.add_argument("--baseline-src", type=Path, help="another checkout to measure the same way (e.g. before streaming)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    ckpt = str(Path(args.ckpt).resolve())
    sources = [(ROOT, "this checkout")]
    if args.baseline_src:
        sources.append((args.baseline_src.resolve(), f"baseline ({args.baseline_src.name})"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cases = [(ckpt, RECIPE, args.repeats, "digits 1x8x8")]
        if args.synthetic:
            cases.append((str(synthetic_checkpoint(Path(d) / "synthetic.ckpt")), SYNTHETIC_RECIPE, 1, "untrained 3x32x32"))
        for case_ckpt, recipe, repeats, model in cases:
            for src, label in sources:
                rows += measure(src, label, case_ckpt, recipe, args.sizes, args.batch_size, repeats, Path(d), model)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    payload = {"ckpt": args.ckpt, "recipe": RECIPE, "synthetic_recipe": SYNTHETIC_RECIPE, "batch_size": args.batch_size, "commit": commit,
               "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows,
               "command": " ".join(["python", "benchmarks/sampling_memory.py", *sys.argv[1:]])}
    columns = ["model", "code", "n", "peak_rss_mib", "rss_min_mib", "rss_max_mib", "growth_vs_first_mib", "rss_mid_mib",
               "rss_last_quarter_mib", "wall_s", "file_mib", "note"]
    write_results(args.out, "sampling_memory", payload, rows, columns)


if __name__ == "__main__":
    main()
