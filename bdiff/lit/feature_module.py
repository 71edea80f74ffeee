"""Train the classifiers whose features FID/KID are measured in, with Lightning.

For the digits, two commands (below); for any other labelled data (an image folder: one class
per folder), :func:`ensure_feature_nets` with ``data=RealData.of_datamodule(...)`` trains a CNN
and an MLP of the data's own classes -- what ``bdiff-evaluate --train-features-if-missing`` runs
for a checkpoint trained on such data. The digits commands::

    # a Lightning run (CSV metrics, ModelCheckpoint under runs/features/digits/version_N/)
    python -m bdiff.lit.feature_module fit --config configs/features/digits.yaml

    # the feature cache that get_feature_extractor("digits") reads:
    # train in-process and write ~/.cache/bdiff/features/digits.pt ($BDIFF_CACHE/features/digits.pt)
    python -m bdiff.lit.feature_module cache [--cache-dir DIR] [--max-epochs 20] [--seed 0] [--split-seed 0]
    # the second feature space, get_feature_extractor("digits_mlp"): an MLP from seed 1 -> digits_mlp.pt
    python -m bdiff.lit.feature_module cache --arch mlp
    # ... or export a checkpoint of a `fit` run instead of training again
    python -m bdiff.lit.feature_module cache --from-ckpt runs/features/digits/version_0/checkpoints/last.ckpt

Both take ``--config`` (a YAML of their options) and ``--print_config``; a bad option ends in one
line and exit status 2 (:mod:`bdiff.console`). In Python, :func:`ensure_feature_nets` trains the
classifiers missing from the cache (what ``bdiff-evaluate --train-features-if-missing`` runs).

Training (20 epochs) takes about 4 s on 2 CPU cores and reaches ~99% validation accuracy (see
``tests/test_metrics_features.py`` for a short run). The train/val split is exactly
:class:`~bdiff.lit.data.DigitsDataModule`'s (same seed, same indices), so a diffusion model and
its feature net never disagree about which digits are held out.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from jsonargparse import ActionConfigFile
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from bdiff.checks import as_integer
from bdiff.console import ArgumentParser, exit_on_user_error
from bdiff.datasets import load_digits
from bdiff.lit.checkpoint_io import AtomicCheckpointIO
from bdiff.lit.data import DigitsDataModule
from bdiff.metrics.feature_net import FeatureNet, FeatureNetConfig
from bdiff.metrics.features import (
    CLASSIFIER_ARCH,
    DIGITS_FILES,
    classifier_path,
    default_cache_dir,
    save_feature_net,
)
from bdiff.metrics.references import RealData

DEFAULT_SEEDS = {"cnn": 0, "mlp": 1}
"""Initial-weight seed per architecture: the second feature space differs in architecture *and* seed."""


def _as_config(value: FeatureNetConfig | dict[str, Any]) -> FeatureNetConfig:
    """Accept the dataclass or the plain dict stored in a checkpoint's hyper-parameters."""
    return FeatureNetConfig(**value) if isinstance(value, dict) else value


class LabelledDigitsDataModule(pl.LightningDataModule):
    """sklearn's bundled digits with labels: batches ``(x, y)``, x (B,1,8,8) float in [0, 1], y (B,) int64.

    The split reuses :class:`~bdiff.lit.data.DigitsDataModule` (same arguments give the same
    train/val indices). Images are in [0, 1], the convention of feature extractors, not the
    diffusion model's [-1, 1].
    """

    channels: int = 1
    image_size: int = 8
    num_classes: int = 10

    def __init__(self, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        # DigitsDataModule validates the arguments and owns the split.
        self._split = DigitsDataModule(batch_size, num_workers, val_fraction, seed)
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._train: Subset | None = None
        self._val: Subset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them exactly as DigitsDataModule does (idempotent)."""
        if self._train is not None:
            return
        full = TensorDataset(*load_digits())  # (1797,1,8,8) in [0,1], (1797,) labels
        self._split.setup(stage)
        train_idx = list(self._split.train_dataset.indices)  # type: ignore[attr-defined]
        val_idx = list(self._split.val_dataset.indices)  # type: ignore[attr-defined]
        self._train, self._val = Subset(full, train_idx), Subset(full, val_idx)

    def _require(self, ds: Subset | None) -> Subset:
        if ds is None:
            raise RuntimeError("LabelledDigitsDataModule.setup() must be called before using the datasets.")
        return ds

    @property
    def train_dataset(self) -> Subset:
        """Training split; items ``(x (1,8,8) in [0,1], y)``."""
        return self._require(self._train)

    @property
    def val_dataset(self) -> Subset:
        """Validation split; items ``(x (1,8,8) in [0,1], y)``."""
        return self._require(self._val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=256, num_workers=self.num_workers)


class LabelledDataModule(pl.LightningDataModule):
    """The labelled splits of :class:`~bdiff.metrics.references.RealData`: batches ``(x, y)``, x (B,C,H,W) in [0, 1]."""

    def __init__(self, data: RealData, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.channels, self.image_size = data.image_shape[0], data.image_shape[1]
        self.num_classes = len(data.class_names)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data.train, self.data.train_labels), batch_size=self.batch_size,
                          shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data.val, self.data.val_labels), batch_size=256)


class FeatureClassifierModule(pl.LightningModule):
    """Cross-entropy training of :class:`~bdiff.metrics.feature_net.FeatureNet` with AdamW.

    The learning rate follows a cosine decay to 0 over the run (Loshchilov & Hutter 2017).
    Logs ``train/loss``, ``val/loss`` and ``val/acc``.

    Args:
        net: shape of the feature net (``in_channels`` and ``image_size`` must match the data).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self, net: FeatureNetConfig = FeatureNetConfig(), lr: float = 3e-3, weight_decay: float = 1e-4
    ) -> None:
        super().__init__()
        net = _as_config(net)
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}")
        # Plain dicts, so the checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters({"net": asdict(net), "lr": lr, "weight_decay": weight_decay})
        self.net = FeatureNet(net)
        self.val_acc = MulticlassAccuracy(num_classes=net.num_classes, average="micro")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        cfg = self.net.config
        data = (getattr(datamodule, "channels", None), getattr(datamodule, "image_size", None))
        if data != (cfg.in_channels, cfg.image_size):
            raise ValueError(
                f"the data gives {data[0]}x{data[1]}x{data[1]} images but model.net expects "
                f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}: set model.net.in_channels={data[0]} "
                f"and model.net.image_size={data[1]}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """x (B,C,H,W) in [0, 1] -> logits (B, num_classes)."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=x.shape[0])
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=x.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(net: FeatureNet, loader: DataLoader) -> float:
    """Top-1 accuracy of ``net`` (in eval mode) over ``(x, y)`` batches."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((net(x).argmax(-1) == y).sum())
        total += y.numel()
    net.train(was_training)
    return correct / total


def _export(net: FeatureNet, val: DataLoader, path: Path, meta: dict[str, Any]) -> Path:
    """Measure the validation accuracy of ``net`` on ``val`` and write it with ``meta`` to ``path``."""
    return save_feature_net(net, path, {**meta, "val_accuracy": accuracy(net, val)})


def train_feature_net(data: RealData, path: Path, arch: str = "cnn", max_epochs: int = 20, seed: int | None = None,
                      accelerator: str = "cpu") -> Path:
    """Train a classifier of ``data``'s classes with a Lightning Trainer and write it to ``path``.

    Args:
        data: the labelled training and validation images (the validation split picks the best epoch).
        path: the feature-net file to write (:func:`~bdiff.metrics.features.classifier_path`).
        arch: ``cnn`` or ``mlp`` (:class:`~bdiff.metrics.feature_net.FeatureNetConfig`).
        max_epochs: epochs over the training split (20: ~99% val accuracy on the digits in ~4 s
            on 2 CPU cores).
        seed: seeds the initial weights and dropout (global RNG state is restored afterwards).
            Default: 0 for the CNN, 1 for the MLP, so the two spaces differ in seed too.
        accelerator: Lightning accelerator; the nets are small, a CPU is fast enough.

    Returns:
        ``path``. The Lightning checkpoint (best validation accuracy, via ModelCheckpoint) lives
        in a temporary folder and is exported, then removed.
    """
    as_integer("max_epochs", max_epochs, 1)
    if arch not in DEFAULT_SEEDS:
        raise ValueError(f"arch must be one of {', '.join(DEFAULT_SEEDS)}, got {arch!r}")
    dm = LabelledDataModule(data)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="bdiff-features-") as tmp:
        torch.manual_seed(DEFAULT_SEEDS[arch] if seed is None else seed)
        config = FeatureNetConfig(in_channels=dm.channels, image_size=dm.image_size, num_classes=dm.num_classes,
                                  arch=arch)  # type: ignore[arg-type]
        module = FeatureClassifierModule(config)
        best = ModelCheckpoint(dirpath=tmp, monitor="val/acc", mode="max", save_top_k=1, filename="best")
        trainer = pl.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=1, logger=False, callbacks=[best],
                             plugins=[AtomicCheckpointIO()], default_root_dir=tmp, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        module.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
    meta = {"data_key": data.key, "classes": list(data.class_names),
            "source": f"train_feature_net(max_epochs={max_epochs}, arch={arch!r})"}
    return _export(module.net.cpu(), dm.val_dataloader(), Path(path), meta)


def train_digits_feature_net(
    cache_dir: Path | None = None,
    max_epochs: int = 20,
    seed: int | None = None,
    accelerator: str = "cpu",
    split_seed: int = 0,
    arch: str = "cnn",
) -> Path:
    """Train the digits feature net (:func:`train_feature_net` on the digits) into ``<cache_dir>/digits.pt``
    (``digits_mlp.pt`` for ``arch="mlp"``); ``split_seed`` must be the diffusion run's ``data.seed`` (0)."""
    if arch not in DIGITS_FILES:
        raise ValueError(f"arch must be one of {', '.join(DIGITS_FILES)}, got {arch!r}")
    data = RealData.digits(split_seed)
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / DIGITS_FILES[arch]
    return train_feature_net(data, path, arch, max_epochs, seed, accelerator)


def export_checkpoint(ckpt_path: str | Path, cache_dir: Path | None = None) -> Path:
    """Write ``<cache_dir>/digits.pt`` from a checkpoint of ``fit --config configs/features/digits.yaml``.

    The validation accuracy stored beside the weights is measured on the checkpoint's own
    validation split (its datamodule hyper-parameters), never on images it was trained on.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise ValueError(
            f"cannot read checkpoint {str(ckpt_path)!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "net" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{str(ckpt_path)!r} is not a checkpoint of FeatureClassifierModule (no net hyper-parameters)")
    module = FeatureClassifierModule(**{k: hp[k] for k in ("net", "lr", "weight_decay") if k in hp})
    module.load_state_dict(ckpt["state_dict"])
    data_hp = ckpt.get("datamodule_hyper_parameters", {})
    data = RealData.digits(int(data_hp.get("seed", 0)))
    cfg = module.net.config
    if (cfg.in_channels, cfg.image_size) != (1, 8):
        shape = f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}"
        raise ValueError(f"{str(ckpt_path)!r} holds a net for {shape} images, not for 1x8x8 digits")
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / DIGITS_FILES[cfg.arch]
    val = LabelledDataModule(data).val_dataloader()
    return _export(module.net, val, path, {"data_key": data.key, "source": str(ckpt_path)})


def ensure_feature_nets(names: Iterable[str | None], cache_dir: Path | None = None, max_epochs: int = 20,
                        data: RealData | None = None) -> list[Path]:
    """Train every classifier feature space among ``names`` (``digits``, ``digits_mlp``, ``classifier``,
    ``classifier_mlp``; other names are skipped) whose file for ``data`` (default: the digits) is missing from
    ``cache_dir``; returns the files written (seconds on a CPU for the digits, about a minute for 32x32 photos)."""
    data = data if data is not None else RealData.digits()
    written = []
    for name in dict.fromkeys(n for n in names if n in CLASSIFIER_ARCH):
        path = classifier_path(name, cache_dir, data.key)
        if not path.is_file():
            written.append(train_feature_net(data, path, CLASSIFIER_ARCH[name], max_epochs))
    return written


def cache_parser() -> ArgumentParser:
    """The options of ``python -m bdiff.lit.feature_module cache``."""
    p = ArgumentParser(prog="python -m bdiff.lit.feature_module cache",
                       description="Train the digits feature net (or export a fit checkpoint) into the feature cache.")
    p.add_argument("--config", action=ActionConfigFile, help="the options below as YAML (e.g. saved with --print_config)")
    p.add_argument("--cache-dir", type=Optional[str], default=None, help=f"default: {default_cache_dir()}")
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--seed", type=Optional[int], default=None,
                   help="seed of the initial weights and dropout (default: 0 cnn, 1 mlp)")
    p.add_argument("--arch", type=str, choices=tuple(DIGITS_FILES), default="cnn",
                   help="cnn: the digits features (digits.pt); mlp: the second feature space (digits_mlp.pt)")
    p.add_argument("--split-seed", type=int, default=0, help="train/val split seed (= the diffusion data.seed)")
    p.add_argument("--from-ckpt", type=Optional[str], default=None, help="export this fit checkpoint instead of training")
    return p


def cache(argv: Sequence[str]) -> Path:
    """``cache ...``: write the feature cache file (train, or export ``--from-ckpt``) and print its accuracy."""
    args = cache_parser().parse_args(list(argv))
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else None
    if args.from_ckpt is not None:
        path = export_checkpoint(args.from_ckpt, cache_dir)
    else:
        path = train_digits_feature_net(cache_dir, max_epochs=args.max_epochs, seed=args.seed,
                                        split_seed=args.split_seed, arch=args.arch)
    meta = torch.load(path, weights_only=True)["meta"]
    print(f"wrote {path} (val accuracy {meta['val_accuracy']:.4f})")
    return path


def main(argv: Sequence[str] | None = None) -> Any:
    """``cache ...`` writes the feature cache; anything else goes to LightningCLI (``fit --config ...``)."""
    from bdiff.lit.cli import BdiffCLI, SaveConfigToRun, cli_args

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["cache"]:
        return cache(args[1:])
    return BdiffCLI(
        FeatureClassifierModule,
        LabelledDigitsDataModule,
        save_config_callback=SaveConfigToRun,
        args=cli_args(argv, args),
        parser_kwargs={"fit": {"description": "Train the digits feature net (FID/KID features)."}},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
