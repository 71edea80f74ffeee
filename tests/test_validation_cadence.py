"""Validation every ``val_check_interval`` steps, and always once more at ``max_steps`` (FinalValidation)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from bdiff.lit.callbacks import FinalValidation, last_validation_of_fit


class Validations(pl.Callback):
    """Records (global step, last_validation_of_fit) at every validation."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, last_validation_of_fit(trainer)))


def validations(max_steps: int, final: bool, **trainer: Any) -> list[tuple[int, bool]]:
    record = Validations()
    callbacks = [record, FinalValidation()] if final else [record]
    pl.Trainer(max_steps=max_steps, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1,
               num_sanity_val_steps=0, callbacks=callbacks, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **trainer,
               ).fit(BoringModel())
    return record.seen


@pytest.mark.parametrize("epoch", [None, 3], ids=["long-epoch", "3-step-epochs"])
def test_the_fit_validates_at_max_steps_once_whatever_the_cadence(epoch: int | None) -> None:
    """Lightning alone validates every 4 steps (counted across epochs) and skips the last weights when 4 does
    not divide max_steps; with FinalValidation the fit's last step is validated too, and only once."""
    kw = {} if epoch is None else {"limit_train_batches": epoch}
    assert validations(10, final=False, **kw) == [(4, False), (8, False)]
    assert validations(10, final=True, **kw) == [(4, False), (8, False), (10, True)]
    assert validations(8, final=True, **kw) == [(4, False), (8, True)]


def test_every_fit_of_the_cli_gets_final_validation(trained) -> None:
    assert sum(isinstance(c, FinalValidation) for c in trained.trainer.callbacks) == 1
