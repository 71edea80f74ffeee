"""benchmarks/default_run_time.py reads Lightning's SimpleProfiler report into the parts of a training run."""

from __future__ import annotations

import pytest
from lightning.pytorch.profilers import SimpleProfiler

from tests.conftest import benchmark_module

default_run_time = benchmark_module("default_run_time")
parse_simple_profiler, split_parts = default_run_time.parse_simple_profiler, default_run_time.split_parts


def test_a_simple_profiler_report_splits_into_the_runs_parts() -> None:
    profiler = SimpleProfiler()
    actions = ["run_training_batch", "run_training_batch", "[LightningModule]DiffusionModule.on_validation_epoch_start",
               "[Strategy]SingleDeviceStrategy.validation_step", "[Callback]SampleGrid.on_fit_end", "save_checkpoint",
               "[Callback]EMA.on_train_batch_end"]
    for action in actions:
        with profiler.profile(action):
            sum(range(20_000))
    parsed = parse_simple_profiler(profiler.summary())
    assert parsed["run_training_batch"][0] == 2
    assert set(actions) <= set(parsed)
    parts = split_parts(parsed, wall=100.0)
    assert parts["training steps"] == parsed["run_training_batch"][1]
    assert parts["previews"] == parsed["[Callback]SampleGrid.on_fit_end"][1]
    assert parts["GP and calibration fits"] == parsed["[LightningModule]DiffusionModule.on_validation_epoch_start"][1]
    assert parts["checkpoint saving"] == parsed["save_checkpoint"][1]
    assert sum(parts.values()) == pytest.approx(100.0)  # the rest is the wall time no part covers
