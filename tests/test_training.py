"""End to end through the real CLI: train, checkpoint, load, resume, and the errors users meet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdiff import load_model
from bdiff.checkpoint import build_denoiser, read_checkpoint
from bdiff.lit.cli import main, with_defaults
from bdiff.nets import UNetConfig
from tests.conftest import CONFIGS, cli_args


def test_fit_logs_writes_outputs_and_prints_them(trained, last_ckpt: Path, capsys) -> None:
    metrics = trained.trainer.callback_metrics
    for key in ("train/loss", "train/nll_per_pixel", "train/kl_weight", "train/grad_norm", "val/mse",
                "val/z2_total", "val/gaussian_nll_total", "val/z2_aleatoric", "val/var_epistemic"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    run = last_ckpt.parent.parent
    assert (run / "samples" / "final.png").stat().st_size > 0
    assert (run / "config.yaml").is_file()
    assert trained.trainer.global_step == 30


def test_load_model_gives_identical_predictions(trained, last_ckpt: Path) -> None:
    live = trained.model.denoiser.eval()
    loaded = load_model(last_ckpt)
    assert not any(p.requires_grad for p in loaded.parameters())
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        a, b = live.predict(x, t), loaded.predict(x, t)
    for field in a._fields:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)


def test_checkpoint_holds_guide_ema_and_optimizer_state(last_ckpt: Path) -> None:
    ckpt = read_checkpoint(last_ckpt)
    keys = ckpt["state_dict"].keys()
    assert "denoiser.model.guide.locs.head__weight_unconstrained" in keys
    assert "denoiser.model.guide.scales.head__weight_unconstrained" in keys
    assert "current_model_state" in ckpt and "averaging_state" in ckpt  # EMA and raw weights
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["hyper_parameters"]["num_data"] == 1617


def test_resume_continues_from_checkpoint(last_ckpt: Path, tmp_path: Path) -> None:
    cli = main(CONFIGS / "digits.yaml", cli_args(tmp_path, "--trainer.max_steps=36", f"--ckpt_path={last_ckpt}"))
    assert cli.trainer.global_step == 36


def test_warm_start_copies_posterior_means(last_ckpt: Path) -> None:
    hp = read_checkpoint(last_ckpt)["hyper_parameters"]
    from bdiff.bayes import BayesConfig
    from bdiff.schedule import ScheduleConfig

    net = UNetConfig(**hp["net"])
    den = build_denoiser(net, BayesConfig(layers="decoder"), ScheduleConfig(), warm_start=last_ckpt)
    trained = load_model(last_ckpt)
    torch.testing.assert_close(den.model.net.stem.weight, trained.model.net.stem.weight)
    head_mean = trained.model.posterior_loc_scale()["head.weight"][0]
    torch.testing.assert_close(den.model.posterior_loc_scale()["head.weight"][0], head_mean)
    with pytest.raises(ValueError, match="warm-start needs the same U-Net"):
        build_denoiser(UNetConfig(base_channels=32), BayesConfig(), ScheduleConfig(), warm_start=last_ckpt)


def test_resume_with_another_architecture_is_refused(last_ckpt: Path, tmp_path: Path) -> None:
    # The CLI takes the architecture from the checkpoint itself; in Python a mismatch must be refused.
    import lightning.pytorch as pl

    from bdiff.lit.data import DigitsDataModule
    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=24, num_heads=2))
    trainer = pl.Trainer(max_steps=40, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(ValueError, match="model.net"):
        trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=last_ckpt)


def test_truncated_and_corrupt_checkpoints_name_the_file(last_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(last_ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.ckpt"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_model(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a bdiff checkpoint"):
        load_model(other)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_pickle_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    _Payload.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}, "x": _Payload()}, path)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_data_model_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.net.in_channels=1"):
        main(CONFIGS / "digits.yaml", cli_args(tmp_path, "--model.net.in_channels=3"))


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("--model.net.widht=3", "widht"), ("--model.lr=fast", "lr"), ("--model.bayes.prior_center=middle", "prior_center")],
)
def test_bad_config_values_name_the_key(arg: str, expected: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(CONFIGS / "digits.yaml", cli_args(tmp_path, arg))
    assert exc.value.code != 0
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(CONFIGS / "digits.yaml", ["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exc.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_default_subcommand_and_config() -> None:
    assert with_defaults([], "d.yaml") == ["fit", "--config", "d.yaml"]
    assert with_defaults(["--trainer.max_steps=3"], "d.yaml") == ["fit", "--config", "d.yaml", "--trainer.max_steps=3"]
    assert with_defaults(["fit", "--config", "x.yaml"], "d.yaml") == ["fit", "--config", "x.yaml"]


def _poisoned_digits(batch_size: int = 64):
    """Digits whose 3rd training batch (no shuffling) is all NaN."""
    from torch.utils.data import DataLoader, Dataset

    from bdiff.lit.data import DigitsDataModule

    class NaNBatch(Dataset):
        def __init__(self, base: Dataset) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int) -> torch.Tensor:
            x = self.base[i]
            return torch.full_like(x, float("nan")) if 2 * batch_size <= i < 3 * batch_size else x

    class Poisoned(DigitsDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(NaNBatch(self.train_dataset), batch_size=batch_size, drop_last=True)

    return Poisoned(batch_size=batch_size)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_loss_raises_naming_the_step_or_is_skipped(mode: str, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), on_nonfinite=mode)
    trainer = pl.Trainer(max_steps=5, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="at step 2"):
            trainer.fit(model, _poisoned_digits())
    else:
        trainer.fit(model, _poisoned_digits())
        assert model.skipped_batches == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_network_output_raises_naming_the_step_or_is_skipped(mode: str) -> None:
    """A finite batch but a NaN weight: caught as NonFiniteElboError, not by matching Pyro's message."""
    import warnings

    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), on_nonfinite=mode, num_data=100)
    with torch.no_grad():
        model.bayes.net.stem.weight[0, 0, 0, 0] = float("nan")
    batch = torch.zeros(4, 1, 8, 8)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"non-finite log-likelihood .* at step 0 \(batch 7\)"):
            model.training_step(batch, 7)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            assert model.training_step(batch, 7) is None
        assert model.skipped_batches == 1


def test_guide_scales_get_their_own_learning_rate() -> None:
    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), lr=1e-3, lr_warmup_steps=0, guide_scale_lr_mult=30,
                            lr_decay="none")  # no trainer, so no max_steps for the cosine
    opt = model.configure_optimizers()["optimizer"]
    scale_ids = {id(p) for n, p in model.named_parameters() if ".guide.scales." in n}
    groups = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[max(groups)] == scale_ids
    assert min(groups) == pytest.approx(1e-3) and max(groups) == pytest.approx(3e-2)
    with pytest.raises(ValueError, match="guide_scale_lr_mult"):
        DiffusionModule(guide_scale_lr_mult=0)


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_bf16_mixed_runs_in_bf16_only_where_the_device_has_bf16_kernels(bf16_kernels: bool, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import bdiff.lit.cli as cli_module

    monkeypatch.setattr(cli_module, "has_fast_bf16", lambda accelerator: bf16_kernels)
    args = cli_args(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_steps=4")
    if bf16_kernels:
        cli = main(CONFIGS / "digits.yaml", args)
    else:
        with pytest.warns(UserWarning, match="no bf16 kernels.*32-true"):
            cli = main(CONFIGS / "digits.yaml", args)
    assert str(cli.trainer.precision) == ("bf16-mixed" if bf16_kernels else "32-true")
    assert cli.trainer.global_step == 4
    # The weights stay float32 in the default memory order: the checkpoint samples like any other.
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in cli.model.parameters())
    loaded = load_model(cli.trainer.checkpoint_callback.last_model_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_validation_measures_the_full_precision_model_under_bf16_autocast(monkeypatch) -> None:
    from bdiff.lit.module import DiffusionModule

    torch.manual_seed(0)
    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), variance_calibration_knots=0).eval()
    batch = torch.rand(16, 1, 8, 8)
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(model, "log_dict", lambda metrics, **kwargs: logged.append(
        {k: float(v) for k, v in metrics.items()}))
    with torch.no_grad():
        model.validation_step(batch, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning wraps around it under bf16-mixed
            model.validation_step(batch, 0)
            pred_bf16 = model.denoiser.predict(torch.randn(16, 1, 8, 8), torch.full((16,), 500))
    assert pred_bf16.eps.dtype == torch.bfloat16  # autocast does reach the network...
    assert logged[0] == logged[1]  # ...but not the validation: its metrics are the float32 model's


def test_cosine_lr_decay_warms_up_then_anneals_to_zero_at_max_steps() -> None:
    from types import SimpleNamespace

    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), lr=1e-3, lr_warmup_steps=10, lr_decay="cosine")
    model._trainer = SimpleNamespace(max_steps=110, precision="32-true")
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-3)  # linear warm-up, then the peak
    assert lrs[60] == pytest.approx(5e-4)  # half-way down the cosine
    assert lrs[-1] < 1e-6 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    model._trainer = SimpleNamespace(max_steps=5, precision="32-true")  # a smoke run, inside the warm-up
    assert model.configure_optimizers()["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-4)
    model._trainer = SimpleNamespace(max_steps=-1, precision="32-true")
    with pytest.raises(ValueError, match="trainer.max_steps"):
        model.configure_optimizers()
    with pytest.raises(ValueError, match="model.lr_decay"):
        DiffusionModule(lr_decay="linear")
