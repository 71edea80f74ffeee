"""W&B the way its users expect (issue 16): checkpoints as artifacts, a per-sample table at the end of
training and from ``bdiff.sample --wandb-project``, and none of it ever failing training or sampling.

Every run here is offline, in a temporary folder (HOME too), so nothing touches the network.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from bdiff.wandb_log import SafeRun, per_sample_uncertainty, sample_table, uncertainty_maps


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """W&B offline under tmp_path (conftest disables it process-wide), one torch thread; runs finished after."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wandb.finish()
    yield wandb
    wandb.finish()
    torch.set_num_threads(threads)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record every table logged (per run id) and every model artifact, then let W&B do its work."""
    from wandb.sdk.wandb_run import Run

    seen: dict[str, list] = {"tables": [], "artifacts": []}
    log, log_artifact = Run.log, Run.log_artifact

    def spy_log(self: Run, data: dict, *args: Any, **kwargs: Any) -> Any:
        for key, value in data.items():
            if type(value).__name__ == "Table":
                seen["tables"].append((self.id, key, value))
        return log(self, data, *args, **kwargs)

    def spy_artifact(self: Run, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        if artifact.type == "model":
            seen["artifacts"].append((self.id, artifact.name, sorted(artifact.manifest.entries), kwargs.get("aliases")))
        return log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(Run, "log", spy_log)
    monkeypatch.setattr(Run, "log_artifact", spy_artifact)
    return seen


# ------------------------------------------------------------------------------------------------
# the table itself


def test_sample_table_has_one_sortable_row_per_sample() -> None:
    images = torch.rand(5, 1, 8, 8)
    variance = torch.stack([torch.full((1, 8, 8), v) for v in (0.04, 0.01, 0.09, 0.0, 0.16)])
    variance[2, 0, :4] = 0.0  # mean 0.045
    nfe = torch.tensor([20, 20, 26, 20, 31])
    logit = torch.tensor([1.5, -0.5, 0.2, 3.0, -2.0])
    table = sample_table(images, variance, nfe, logit, first_index=100)
    assert table.columns == ["index", "image", "uncertainty_map", "uncertainty", "nfe", "critic_logit"]
    assert len(table.data) == 5
    rows = {row[0]: row for row in table.data}
    assert sorted(rows) == [100, 101, 102, 103, 104]
    expected = variance.flatten(1).mean(1)  # the mean per-pixel variance, as bdiff.metrics.usefulness uses
    for i in range(5):
        assert rows[100 + i][3] == pytest.approx(float(expected[i]))
        assert rows[100 + i][4] == int(nfe[i]) and rows[100 + i][5] == pytest.approx(float(logit[i]))
    by_uncertainty = [row[0] for row in sorted(table.data, key=lambda r: r[3])]
    assert by_uncertainty == [103, 101, 100, 102, 104]
    image = rows[100][1].image
    assert image.size == (64, 64)  # 8x8 digits upscaled 8x (nearest) so they are visible in the UI
    assert torch.equal(torch.tensor(list(image.getdata())).reshape(64, 64)[::8, ::8],
                       (images[0, 0] * 255).round().to(torch.long))

    plain = sample_table(images, None, nfe)  # no uncertainty and no critic: those columns are left out
    assert plain.columns == ["index", "image", "nfe"]
    rgb = sample_table(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.tensor([5, 5]))
    assert rgb.data[0][1].image.size == (64, 64) and rgb.data[0][1].image.mode == "RGB"
    with pytest.raises(ValueError, match="nfe"):
        sample_table(images, variance, nfe[:3])
    with pytest.raises(ValueError, match="variance"):
        sample_table(images, variance[:, :, :4], nfe)


def test_uncertainty_maps_share_one_scale() -> None:
    variance = torch.stack([torch.full((1, 4, 4), 0.01), torch.full((1, 4, 4), 0.04)])
    variance[1, 0, 0, 0] = 1.0  # one outlier pixel above the 99th percentile
    maps = uncertainty_maps(variance)
    assert maps.shape == (2, 1, 4, 4) and maps.min() == 0 and maps.max() == 1
    assert maps[0].max() == 0 and 0 < maps[1, 0, 1, 1] < 1  # the quieter sample is darker, on the same scale
    assert per_sample_uncertainty(variance).tolist() == pytest.approx([0.01, (15 * 0.04 + 1.0) / 16])


# ------------------------------------------------------------------------------------------------
# training: checkpoints as artifacts, the table at the end, log_model auto


def _fit(tmp_path: Path, steps: int = 3, **logger_kwargs: Any) -> tuple[pl.Trainer, Any, list[str]]:
    """A tiny fit with an offline AutoWandbLogger, a checkpoint and the final preview; returns the W&B warnings."""
    from bdiff.lit.callbacks import SampleGrid
    from bdiff.lit.data import DigitsDataModule
    from bdiff.lit.module import DiffusionModule
    from bdiff.lit.wandb import AutoWandbLogger
    from bdiff.nets import UNetConfig

    logger = AutoWandbLogger(project="bdiff-test", save_dir=str(tmp_path), **{"mode": "offline", **logger_kwargs})
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(max_steps=steps, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                         callbacks=[checkpoint, SampleGrid(every_n_steps=0, num_samples=4, steps=2, chains=2)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), lr_warmup_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DigitsDataModule(batch_size=64))
    return trainer, logger, [str(w.message) for w in caught if "W&B" in str(w.message)]


def test_log_model_is_on_for_online_runs_and_said_off_for_offline_ones(
    wandb_offline: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bdiff.lit import wandb as lit_wandb

    said: list[str] = []
    monkeypatch.setattr(lit_wandb, "rank_zero_info", said.append)
    online = lit_wandb.AutoWandbLogger(save_dir=str(tmp_path), mode="online")  # no run is started here
    assert online.log_model is True and said == []
    offline = lit_wandb.AutoWandbLogger(save_dir=str(tmp_path))  # no credentials: offline
    assert offline.log_model is False
    assert len(said) == 1 and "no credentials" in said[0] and "checkpoints are not logged as artifacts" in said[0]
    assert "log_model: true" in said[0]
    assert lit_wandb.AutoWandbLogger(save_dir=str(tmp_path), mode="offline", log_model=True).log_model is True
    assert lit_wandb.AutoWandbLogger(save_dir=str(tmp_path), mode="online", log_model="all").log_model == "all"
    assert lit_wandb.AutoWandbLogger(save_dir=str(tmp_path), mode="disabled").log_model is False
    with pytest.raises(ValueError, match="log_model"):
        lit_wandb.AutoWandbLogger(save_dir=str(tmp_path), log_model="best")  # type: ignore[arg-type]


def test_training_logs_the_checkpoints_and_a_sample_table(wandb_offline: Any, spy: dict, tmp_path: Path) -> None:
    trainer, logger, warned = _fit(tmp_path, log_model=True)
    assert warned == [] and logger.failures == []
    run_id = logger.experiment.id
    assert [(a[0], a[1], a[2]) for a in spy["artifacts"]] == [(run_id, f"model-{run_id}", ["model.ckpt"])] * 2
    assert {tuple(a[3]) for a in spy["artifacts"]} == {("latest", "best"), ("latest",)}  # best and last checkpoints
    ((table_run, key, table),) = spy["tables"]
    assert (table_run, key) == (run_id, "samples_table")
    assert table.columns == ["index", "image", "uncertainty_map", "uncertainty", "nfe"]
    assert len(table.data) == 4 and all(row[4] == 2 for row in table.data)  # DDIM-2: two calls per sample
    assert all(row[3] >= 0 for row in table.data)


def test_offline_default_logs_no_artifacts(wandb_offline: Any, spy: dict, tmp_path: Path) -> None:
    _, logger, _ = _fit(tmp_path, steps=2)
    assert logger.log_model is False and spy["artifacts"] == [] and len(spy["tables"]) == 1


# ------------------------------------------------------------------------------------------------
# fault injection: the new calls never stop training


def test_a_failing_artifact_upload_continues_offline(wandb_offline: Any, spy: dict, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """``log_artifact`` raises in the first run (disk full while staging the checkpoint): training ends
    normally, one warning, and the checkpoint is logged again in the offline run W&B fell back to."""
    from wandb.sdk.wandb_run import Run

    spying = Run.log_artifact
    first: list[str] = []  # the id of the run W&B started with

    def broken(self: Run, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        first[:] = first or [self.id]
        if artifact.type == "model" and self.id == first[0]:
            raise OSError(28, "No space left on device (injected)")
        return spying(self, artifact, *args, **kwargs)

    monkeypatch.setattr(Run, "log_artifact", broken)
    trainer, logger, warned = _fit(tmp_path, log_model=True)
    assert trainer.global_step == 3 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(warned) == 1 and "Training continues; W&B now logs offline" in warned[0], warned
    assert "finalize" in warned[0] and "No space left on device" in warned[0]
    assert not logger.switched_off
    fallback = logger.experiment.id
    assert fallback != first[0] and {a[0] for a in spy["artifacts"]} == {fallback}


def test_a_table_that_cannot_be_built_is_skipped(wandb_offline: Any, spy: dict, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    import wandb

    def broken_table(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("unsupported cell type (injected)")

    monkeypatch.setattr(wandb, "Table", broken_table)
    trainer, logger, warned = _fit(tmp_path)
    assert trainer.global_step == 3
    assert len(warned) == 1 and "could not be built" in warned[0] and "injected" in warned[0], warned
    assert logger.failures == [] and not logger.switched_off  # the rest of W&B logging is unaffected


def test_a_failing_table_upload_continues_offline(wandb_offline: Any, spy: dict, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from wandb.sdk.wandb_run import Run

    spying, runs = Run.log, []

    def flaky(self: Run, data: dict, *args: Any, **kwargs: Any) -> Any:
        runs.append(self.id)
        if "samples_table" in data and self.id == runs[0]:
            raise ConnectionResetError("connection to the W&B service was reset (injected)")
        return spying(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", flaky)
    trainer, logger, warned = _fit(tmp_path)
    assert trainer.global_step == 3
    assert len(warned) == 1 and "log_sample_table 'samples_table'" in warned[0], warned
    ((table_run, _, table),) = spy["tables"]
    assert table_run == logger.experiment.id != runs[0] and len(table.data) == 4


def test_training_survives_w_and_b_failing_everywhere(wandb_offline: Any, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """Every log and artifact call raises, in every run: W&B is switched off once, training and checkpoints finish."""
    from wandb.sdk.wandb_run import Run

    def down(self: Run, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("W&B is down (injected)")

    monkeypatch.setattr(Run, "log", down)
    monkeypatch.setattr(Run, "log_artifact", down)
    trainer, logger, warned = _fit(tmp_path, log_model=True)
    assert trainer.global_step == 3 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert logger.switched_off and any("switched off" in w for w in warned)


# ------------------------------------------------------------------------------------------------
# bdiff.sample --wandb-project


def _write_critic(path: Path) -> Path:
    """An untrained but valid critic checkpoint for 8x8 digits with the default schedule."""
    from dataclasses import asdict

    from bdiff.critic import CriticConfig, CriticNet
    from bdiff.schedule import ScheduleConfig

    config = CriticConfig(image_size=8, width=8, levels=2)
    net = CriticNet(config)
    torch.save({"hyper_parameters": {"critic": asdict(config), "schedule": asdict(ScheduleConfig())},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def test_sample_logs_a_table_with_the_critic_logit(wandb_offline: Any, spy: dict, last_ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from bdiff.metrics.samples_file import load_samples
    from bdiff.sample import main

    critic = _write_critic(tmp_path / "critic.ckpt")
    recipe = tmp_path / "critic.yaml"
    recipe.write_text(f"stepper: DDIM\nsteps: 3\nposterior_samples: 2\ncallbacks:\n"
                      f"  - {{class_path: CriticCorrection, init_args: {{critic: {critic}, weight: 0.0, retries: 0}}}}\n")
    out = tmp_path / "out" / "s.npz"
    out.parent.mkdir()
    main(["--ckpt", str(last_ckpt), "--sampler", str(recipe), "--n", "7", "--batch-size", "3", "--out", str(out),
          "--wandb-project", "bdiff-test", "--wandb-rows", "5"])
    samples = load_samples(out)
    ((run_id, key, table),) = spy["tables"]
    assert key == "samples" and samples.config["wandb"] == {"project": "bdiff-test", "run_id": run_id}
    assert table.columns == ["index", "image", "uncertainty_map", "uncertainty", "nfe", "critic_logit"]
    assert [row[0] for row in table.data] == [0, 1, 2, 3, 4]  # the first --wandb-rows samples
    expected = samples.variance[:5].flatten(1).mean(1)  # the table's uncertainty is the samples file's
    assert [row[3] for row in table.data] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-9)
    assert all(row[4] == 3 for row in table.data) and all(isinstance(row[5], float) and row[5] == row[5]
                                                          for row in table.data)
    printed = capsys.readouterr().out
    assert f"WANDB_RUN_ID={run_id} WANDB_RESUME=allow bdiff-evaluate --samples {out}" in printed
    assert list((out.parent / "wandb").glob(f"offline-run-*-{run_id}"))  # the run sits beside the samples


def test_sample_without_a_critic_has_no_critic_column(wandb_offline: Any, spy: dict, last_ckpt: Path,
                                                      tmp_path: Path) -> None:
    from bdiff.sample import main
    from tests.conftest import CONFIGS

    main(["--ckpt", str(last_ckpt), "--sampler", str(CONFIGS / "sampler" / "ddim.yaml"), "--n", "3",
          "--out", str(tmp_path / "s.npz"), "--wandb-project", "bdiff-test"])
    ((_, _, table),) = spy["tables"]
    assert "critic_logit" not in table.columns and len(table.data) == 3


def test_sample_survives_w_and_b_failing(wandb_offline: Any, monkeypatch: pytest.MonkeyPatch, last_ckpt: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """W&B cannot start (and its offline fallback cannot either): the samples file is written all the same."""
    import wandb

    from bdiff.metrics.samples_file import load_samples
    from bdiff.sample import main
    from tests.conftest import CONFIGS

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise wandb.errors.CommError("api.wandb.ai is unreachable (injected)")

    monkeypatch.setattr(wandb, "init", unreachable)
    out = tmp_path / "s.npz"
    main(["--ckpt", str(last_ckpt), "--sampler", str(CONFIGS / "sampler" / "ddim.yaml"), "--n", "3", "--out", str(out),
          "--wandb-project", "bdiff-test"])
    assert load_samples(out).images.shape == (3, 1, 8, 8) and "wandb" not in load_samples(out).config
    err = capsys.readouterr().err
    assert "W&B logging is switched off" in err and "unreachable (injected)" in err


def test_safe_run_falls_back_offline_then_switches_off(wandb_offline: Any, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from wandb.sdk.wandb_run import Run

    run = SafeRun("bdiff-test", dir=tmp_path, job_type="sample", config={"n": 1})
    first = run.id
    assert run.offline and run.log(lambda: {"x": 1.0}, "metrics")
    calls: list[str] = []
    original = Run.log

    def flaky(self: Run, data: dict, *args: Any, **kwargs: Any) -> Any:
        calls.append(self.id)
        if len(calls) == 1:
            raise ConnectionResetError("reset (injected)")
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", flaky)
    assert run.log(lambda: {"x": 2.0}, "metrics")  # retried in the fallback run
    assert run.id != first and calls == [first, run.id] and not run.switched_off
    assert "W&B now logs offline" in capsys.readouterr().err

    def boom() -> dict:
        raise RuntimeError("cannot build (injected)")

    assert not run.log(boom, "metrics") and run.switched_off and run.id is None
    assert not run.log(lambda: {"x": 3.0}, "metrics")  # off: nothing is tried any more
    run.finish()
    assert json.dumps(run.failures)  # plain strings, e.g. for a summary
