"""Wall time of the whole default training run (``python train.py``) and of its parts.

    python benchmarks/default_run_time.py [--config configs/digits.yaml] [--label default] [-- <train.py overrides>]

Runs ``train.py fit`` in a subprocess exactly as a user does (W&B offline into a temporary folder,
no progress bar), with Lightning's ``SimpleProfiler`` attached, and splits the wall time into:
the training steps (Lightning's ``run_training_batch``: forward, backward, optimizer, EMA), the
validation steps, the fits at each validation's start and end (the bottleneck GP, the variance
calibration), the sample-grid previews, checkpoint saving, and the rest (start-up, imports,
data). Appends one row per run to ``benchmarks/results/default_run_time.json`` and prints it.
Run one job at a time: two torch processes on 2 cores each run several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, write_json

# (part, pattern over SimpleProfiler action names); an action counts in the first part it matches.
PARTS: tuple[tuple[str, str], ...] = (
    ("training steps", r"^run_training_batch$"),
    ("validation steps", r"\.validation_step$"),
    ("GP and calibration fits", r"^\[LightningModule\]\w+\.on_validation_epoch_(start|end)$"),
    ("previews", r"^\[Callback\]SampleGrid.*\.on_(fit_end|train_end|validation_end|validation_epoch_end)$"),
    ("checkpoint saving", r"^save_checkpoint$"),
)
# where a training step's time goes: Lightning's forward (training_step) and backward actions
STEP_SPLIT = (("forward", "[Strategy]SingleDeviceStrategy.training_step"), ("backward", "[Strategy]SingleDeviceStrategy.backward"))
ROW = re.compile(r"^\|\s*(?P<action>[^|]+?)\s*\|\s*(?P<mean>[\d.e+-]+)\s*\|\s*(?P<calls>\d+)\s*\|\s*(?P<total>[\d.e+-]+)\s*\|")


def parse_simple_profiler(text: str) -> dict[str, tuple[int, float]]:
    """SimpleProfiler's report -> {action: (calls, total seconds)}."""
    out: dict[str, tuple[int, float]] = {}
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m and m["action"] not in ("Action", "Total"):
            out[m["action"]] = (int(m["calls"]), float(m["total"]))
    return out


def split_parts(actions: dict[str, tuple[int, float]], wall: float) -> dict[str, float]:
    """Seconds per part of :data:`PARTS`; ``rest`` is the wall time none of them covers."""
    parts = {name: 0.0 for name, _ in PARTS}
    for action, (_, total) in actions.items():
        for name, pattern in PARTS:
            if re.search(pattern, action):
                parts[name] += total
                break
    parts["rest (start-up, data, logging)"] = wall - sum(parts.values())
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--label", default="default", help="name of this row in the results file")
    p.add_argument("--out", type=Path, default=RESULTS / "default_run_time.json")
    p.add_argument("--keep-run", type=Path, default=None,
                   help="train into this folder and keep it (checkpoints, W&B files) instead of a temporary one")
    p.add_argument("overrides", nargs="*", help="extra train.py arguments, after --")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.keep_run.resolve()) if args.keep_run else scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / args.config),
               "--trainer.default_root_dir", tmp, "--trainer.logger.init_args.save_dir", tmp,
               "--trainer.enable_progress_bar", "false",
               "--trainer.profiler.class_path", "lightning.pytorch.profilers.SimpleProfiler",
               "--trainer.profiler.init_args.dirpath", tmp, "--trainer.profiler.init_args.filename", "profile",
               *args.overrides]
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": tmp}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"train.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        reports = sorted(Path(tmp).glob("*profile*.txt"))
        if not reports:
            sys.exit(f"no SimpleProfiler report in {tmp}: {sorted(os.listdir(tmp))}")
        actions = parse_simple_profiler(reports[-1].read_text())
    steps_calls = actions.get("run_training_batch", (0, 0.0))[0]
    row = {
        "label": args.label,
        "config": args.config,
        "overrides": args.overrides,
        "wall_s": round(wall, 1),
        "training_steps": steps_calls,
        "ms_per_step": round(1e3 * actions.get("run_training_batch", (0, 0.0))[1] / max(1, steps_calls), 1),
        "parts_s": {k: round(v, 1) for k, v in split_parts(actions, wall).items()},
        "step_split_s": {name: round(actions.get(action, (0, 0.0))[1], 1) for name, action in STEP_SPLIT},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown",
        "threads": os.cpu_count(),
    }
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    write_json(args.out, [*rows, row])
    print(f"{row['label']}: {row['wall_s']:.0f} s = {row['wall_s'] / 60:.1f} min, {steps_calls} steps at "
          f"{row['ms_per_step']} ms")
    for name, seconds in row["parts_s"].items():
        print(f"  {name:32s} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
