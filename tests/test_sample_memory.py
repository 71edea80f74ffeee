"""Bounded memory when sampling many images (issue 7): nothing held in memory grows with N.

The measured numbers (peak RSS of ``python -m bdiff.sample`` for N = 1k/5k/20k) come from
``benchmarks/sampling_memory.py``; these tests pin the behaviour behind them without timing:
chunks go to disk as they are finished, the live tensors at any point of a run are the
same for N = 400 as for N = 100, and the streamed file equals the one-shot one.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import bdiff.sample
from bdiff.bayes import BayesConfig
from bdiff.sampling import DDIM
from bdiff.bayes.error_scale import EpistemicErrorScale
from bdiff.checkpoint import build_denoiser
from bdiff.metrics.samples_file import SampleSet, SamplesWriter, load_samples, save_samples
from bdiff.nets import UNetConfig
from bdiff.schedule import ScheduleConfig


def tiny_checkpoint(path: Path) -> Path:
    """An untrained 8x8 Bayesian U-Net (8 base channels, 100-step schedule) saved as a bdiff checkpoint.

    It carries an epistemic error scale r(t) = 1, as a trained run's checkpoint carries a fitted one.
    """
    net, bayes, schedule = UNetConfig(base_channels=8, num_heads=2), BayesConfig(), ScheduleConfig(timesteps=100)
    torch.manual_seed(0)
    den = build_denoiser(net, bayes, schedule)
    state = {"denoiser." + k: v for k, v in den.state_dict().items()}
    hp = {"net": asdict(net), "bayes": asdict(bayes), "schedule": asdict(schedule)}
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = EpistemicErrorScale(knots=(0, schedule.timesteps - 1), scale=(1.0, 1.0))
    torch.save({"hyper_parameters": hp, "state_dict": state, "epistemic_error_scale": scale.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("memory") / "tiny.ckpt")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "ddim_recorder.yaml"
    path.write_text("stepper: DDIM\nsteps: 3\nposterior_samples: 2\ncallbacks:\n  - VarianceWeightedBlending\n"
                    "  - {class_path: Recorder, init_args: {keys: [x, x0, var], max_records: 10, max_samples: 50}}\n")
    return path


def live_tensor_bytes() -> int:
    """Bytes of all tensor storages reachable from Python objects (each storage counted once)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu" and not obj.is_sparse:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def run_and_watch(monkeypatch: pytest.MonkeyPatch, ckpt: Path, recipe: Path, out: Path, n: int, batch: int) -> dict:
    """Run ``bdiff.sample.main`` and record, at every chunk write and at the end, the live tensor bytes."""
    seen: dict = {"chunks": [], "live": []}
    write, finish = SamplesWriter.write, SamplesWriter.finish

    def spy_write(self, images, variance=None):
        seen["chunks"].append(len(images))
        seen["live"].append(live_tensor_bytes())
        return write(self, images, variance)

    def spy_finish(self, *args, **kwargs):
        seen["live"].append(live_tensor_bytes())
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(SamplesWriter, "write", spy_write)
    monkeypatch.setattr(SamplesWriter, "finish", spy_finish)
    bdiff.sample.main(["--ckpt", str(ckpt), "--sampler", str(recipe), "--n", str(n), "--batch-size", str(batch), "--out", str(out)])
    monkeypatch.undo()
    return seen


def test_live_memory_does_not_grow_with_n(monkeypatch: pytest.MonkeyPatch, ckpt: Path, recipe: Path, tmp_path: Path) -> None:
    small = run_and_watch(monkeypatch, ckpt, recipe, tmp_path / "small.npz", n=100, batch=50)
    large = run_and_watch(monkeypatch, ckpt, recipe, tmp_path / "large.npz", n=400, batch=50)
    assert small["chunks"] == [50] * 2 and large["chunks"] == [50] * 8  # written chunk by chunk
    # One chunk of output: images + variance (+ their [0,1]-scale copies), 50 x 1x8x8 float32 each.
    chunk_bytes = 4 * 50 * 64 * 4
    assert max(large["live"]) - max(small["live"]) < chunk_bytes, (small["live"], large["live"])
    # Flat within the large run too: the last chunk and the end hold no more than the first chunk.
    assert max(large["live"][1:]) - large["live"][0] < chunk_bytes, large["live"]
    assert load_samples(tmp_path / "large.npz").images.shape == (400, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.npz", "large.png", "small.npz", "small.png"]


def test_streamed_file_equals_one_shot_save(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images, variance = torch.rand(7, 2, 3, 5, generator=g), torch.rand(7, 2, 3, 5, generator=g) / 10
    save_samples(tmp_path / "one.npz", SampleSet(images, variance, 4.5, 1.25, {"a": [1, 2]}))
    with SamplesWriter(tmp_path / "streamed.npz", 7, (2, 3, 5), with_variance=True) as w:
        for lo in range(0, 7, 3):
            w.write(images[lo : lo + 3], variance[lo : lo + 3])
        w.finish(4.5, 1.25, {"a": [1, 2]})
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "streamed.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key], b[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "streamed.npz"]  # no temporary parts left


def test_streamed_run_equals_one_chunk_run(ckpt: Path, recipe: Path, tmp_path: Path) -> None:
    for name, batch in (("one", "30"), ("chunked", "7")):
        bdiff.sample.main(["--ckpt", str(ckpt), "--sampler", str(recipe), "--n", "30", "--batch-size", batch,
                           "--out", str(tmp_path / f"{name}.npz")])
    one, chunked = load_samples(tmp_path / "one.npz"), load_samples(tmp_path / "chunked.npz")
    torch.testing.assert_close(one.images, chunked.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.variance, chunked.variance, rtol=1e-3, atol=1e-9)
    assert one.nfe == chunked.nfe == 3


def test_bad_chunk_stops_the_run_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    out.write_bytes(b"an earlier file")
    bad = torch.rand(2, 1, 4, 4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"samples 2\.\.3: 'images' contains NaN"):
        with SamplesWriter(out, 6, (1, 4, 4), with_variance=False) as w:
            w.write(torch.rand(2, 1, 4, 4))
            w.write(bad)
    with pytest.raises(ValueError, match="only 2 of n=6"):
        with SamplesWriter(out, 6, (1, 4, 4), with_variance=False) as w:
            w.write(torch.rand(2, 1, 4, 4))
            w.finish(1.0, 0.0, {})
    with pytest.raises(ValueError, match=r"image shape \(1, 4, 5\), expected \(1, 4, 4\)"):
        with SamplesWriter(out, 6, (1, 4, 4), with_variance=False) as w:
            w.write(torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="more than the n=2"):
        with SamplesWriter(out, 2, (1, 4, 4), with_variance=False) as w:
            w.write(torch.rand(3, 1, 4, 4))
    assert out.read_bytes() == b"an earlier file" and [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_recorder_is_bounded_per_chunk(ckpt: Path) -> None:
    from bdiff.checkpoint import load_model
    from bdiff.sampler_callbacks import Recorder, RecorderOutput
    from bdiff.sampling.recipe import Recipe

    den = load_model(ckpt, num_samples=2)
    sampler = Recipe(DDIM(), 6, callbacks=[Recorder(keys=["x0"], max_records=4, max_samples=3)]).build(den)
    for first in (0, 20, 40):  # chunks of one run: each starts with an empty record list
        records = sampler.sample(20, seed=0, first_index=first).output(RecorderOutput).records
        assert len(records) == 4 and all(r["x0"].shape == (3, 1, 8, 8) for r in records)
