"""Real vs generated images for critic training.

Real images come from any :class:`~bdiff.lit.data.ImageDataModule` (its own train/val split, the
same one the diffusion model was trained on when the seed matches). Generated ones are drawn from
a diffusion checkpoint with one of our sampler recipes, ``fakes_per_real`` times as many as the
real split (default 1), from a seed of their own (default 1000, away from the seeds evaluation uses), and cached on disk keyed by the
checkpoint's bytes, the recipe, the count and the seed, so a second run does not sample again.

Batches are ``(x0, label)``: x0 (B,C,H,W) in [-1, 1], label (B,) float, 1 for real, 0 for generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.lit.data import DigitsDataModule, ImageDataModule
from bdiff.sampling.recipe import Recipe, load_recipe
from bdiff.schedule import ScheduleConfig


class _Labelled(Dataset):
    """Images of ``dataset`` with a constant label."""

    def __init__(self, dataset: Dataset, label: float) -> None:
        self.dataset, self.label = dataset, torch.tensor(label)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.dataset[index], self.label


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def generate_fakes(ckpt: str | Path, recipe: Recipe, n: int, seed: int, batch_size: int = 500) -> Tensor:
    """``n`` samples (n,C,H,W) in [-1, 1] from ``ckpt`` with ``recipe``; sample i depends on (seed, i) only."""
    denoiser = load_model(ckpt, num_samples=recipe.posterior_samples)
    sampler = recipe.build(denoiser)
    parts = [result.images for _, result in sampler.sample_chunks(n, batch_size, seed=seed)]
    return torch.cat(parts)


class CriticDataModule(LightningDataModule):
    """Real images (label 1) and samples of a diffusion checkpoint (label 0); see module docstring.

    Args:
        diffusion_ckpt: the diffusion checkpoint whose samples the critic learns to tell apart.
        sampler: the sampler recipe (YAML) that draws them, ideally the one the critic will correct.
        real: the real data (default: the bundled digits with seed 0, the default run's split).
        fake_seed: seed of the generated images (keep it away from the evaluation seeds).
        batch_size: images per batch (real and generated shuffled together).
        fakes_per_real: generated images per real one, in each of the train and val splits. More than 1
            gives the critic more of the model's distribution to learn; with a k-times imbalance the
            optimal logit is log p_data / p_model - log k, a constant shift: the guidance gradient is
            unchanged, and :func:`bdiff.critic.load_critic` adds log k back (the checkpoint records k),
            so the logit and the loop's ``threshold`` mean the same for every k.
        cache_dir: where generated images are cached (None: do not cache).
    """

    def __init__(
        self,
        diffusion_ckpt: str,
        sampler: str = "configs/sampler/dpmpp.yaml",
        real: ImageDataModule | None = None,
        fake_seed: int = 1000,
        batch_size: int = 128,
        num_workers: int = 0,
        fakes_per_real: int = 1,
        cache_dir: str | None = "runs/critic/fakes",
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"critic data needs batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if isinstance(fakes_per_real, bool) or not isinstance(fakes_per_real, int) or fakes_per_real < 1:
            raise ValueError(f"critic data: fakes_per_real must be an integer >= 1 (generated images per real one), "
                             f"got {fakes_per_real!r}")
        self.fakes_per_real = fakes_per_real
        self.diffusion_ckpt = Path(diffusion_ckpt)
        hp = read_checkpoint(self.diffusion_ckpt)["hyper_parameters"]  # fails early, naming the file
        self.schedule_config = ScheduleConfig(**hp["schedule"])
        self.recipe = load_recipe(sampler)
        self.real = real if real is not None else DigitsDataModule()
        net = hp["net"]
        if (net["in_channels"], net["image_size"]) != (self.real.channels, self.real.image_size):
            raise ValueError(
                f"diffusion checkpoint {str(self.diffusion_ckpt)!r} makes {net['in_channels']}x{net['image_size']}x"
                f"{net['image_size']} images but the real data has {self.real.channels}x{self.real.image_size}x"
                f"{self.real.image_size}: use the data the diffusion model was trained on"
            )
        self.fake_seed, self.batch_size, self.num_workers = fake_seed, batch_size, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    @property
    def image_size(self) -> int:
        return self.real.image_size

    @property
    def channels(self) -> int:
        return self.real.channels

    def _cache_key(self, n: int) -> str:
        spec = {"ckpt": _file_digest(self.diffusion_ckpt), "recipe": self.recipe.config, "n": n, "seed": self.fake_seed}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def fakes(self, n: int) -> Tensor:
        """``n`` generated images (n,C,H,W), from the cache when there."""
        path = self.cache_dir / f"{self._cache_key(n)}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        rank_zero_info(f"critic data: drawing {n} samples from {self.diffusion_ckpt} with recipe {self.recipe.name!r}")
        images = generate_fakes(self.diffusion_ckpt, self.recipe, n, self.fake_seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(images, tmp)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
        return images

    def _split_sizes(self, stage: str | None = None) -> tuple[int, int]:
        """(train, val) sizes of the real split, which the generated images match."""
        self.real.setup(stage)
        return len(self.real.train_dataset), len(self.real.val_dataset)  # type: ignore[arg-type]

    def prepare_data(self) -> None:
        """Draw and cache the generated images once per node, before any rank's ``setup``.

        Lightning runs this on local rank 0 only and makes the other ranks wait, so under DDP
        the samples are drawn once and every rank's ``setup`` reads the cache. Without a cache
        directory there is nothing to share, and each rank draws them itself in ``setup``.
        The other ranks wait at a barrier meanwhile: for a very large real set, raise the DDP
        strategy's ``timeout`` or fill the cache first with one process.
        """
        self.real.prepare_data()
        if self.cache_dir is not None:
            self.fakes(self.fakes_per_real * sum(self._split_sizes("fit")))

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        n_train, n_val = self._split_sizes(stage)
        real_train, real_val = self.real.train_dataset, self.real.val_dataset
        k = self.fakes_per_real
        fake = self.fakes(k * (n_train + n_val))
        self._train = ConcatDataset([_Labelled(real_train, 1.0), _Labelled(TensorDataset(fake[: k * n_train]), 0.0)])
        self._val = ConcatDataset([_Labelled(real_val, 1.0), _Labelled(TensorDataset(fake[k * n_train :]), 0.0)])

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("CriticDataModule.setup() must be called before the dataloaders")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, num_workers=self.num_workers,
                          collate_fn=_collate, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``(x0 (B,C,H,W), label (B,))`` batches."""
        return self._loader(self._train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, train=False)


def _collate(items: list[tuple[Any, Tensor]]) -> tuple[Tensor, Tensor]:
    """TensorDataset items are 1-tuples; real datasets give tensors: stack both the same way."""
    xs = [x[0] if isinstance(x, tuple) else x for x, _ in items]
    return torch.stack(xs), torch.stack([y for _, y in items]).float()
