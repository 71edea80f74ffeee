"""Interleaved wall-clock timing for the cost benchmarks.

torch.utils.benchmark times one statement at a time; on a shared 2-core machine whose speed drifts
by 10-20% over minutes, two statements timed a minute apart can differ by that much for no reason
of their own. Timing every function once per round, round after round, lets drift hit all of them
alike, so their *ratios* (what the cost targets are about) hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int = 15) -> dict[str, float]:
    """Median wall seconds of one call of each of ``fns``, over ``rounds`` rounds that call every function once
    in turn (after one warm-up round, not counted)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}
