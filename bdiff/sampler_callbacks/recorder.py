"""Keep chosen per-step tensors of a sampling run, within a memory bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampler_callbacks.variance import x0_epistemic_variance


@dataclass
class RecorderOutput:
    """:class:`Recorder`'s run: one dict per recorded step (step, t and the chosen tensors, on CPU)."""

    records: list[dict] = field(default_factory=list)


class Recorder(SamplerCallback):
    """Keep chosen per-step tensors, every ``every`` steps, at most ``max_records`` (on CPU).

    Records land in the run's :class:`RecorderOutput` as a list of dicts with the step, t and
    the chosen keys among ``x``, ``x0``, ``x0_var``, ``var``, ``eps``, ``var_epistemic``,
    ``var_aleatoric``; rows limited to the first ``max_samples`` samples. Memory is bounded by
    max_records * max_samples * len(keys) images.
    """

    name = "recorder"
    KEYS = ("x", "x0", "x0_var", "var", "eps", "var_epistemic", "var_aleatoric")

    def __init__(self, keys: Sequence[str] = ("x0", "var"), every: int = 1, max_records: int = 100, max_samples: int = 16) -> None:
        bad = sorted(set(keys) - set(self.KEYS))
        if bad:
            raise ValueError(f"recorder keys {bad} unknown; choose from {list(self.KEYS)}")
        if every < 1 or max_records < 1 or max_samples < 1:
            raise ValueError("recorder needs every, max_records and max_samples >= 1")
        self.keys, self.every, self.max_records, self.max_samples = tuple(keys), every, max_records, max_samples

    def on_start(self, state: SamplerState, sampler: Sampler) -> RecorderOutput:
        return RecorderOutput()

    def after_update(self, state: SamplerState, sampler: Sampler) -> None:
        records = state.outputs[self].records
        if state.step % self.every or len(records) >= self.max_records:
            return
        n = self.max_samples
        sources = {
            "x": state.x, "x0": state.x0, "x0_var": x0_epistemic_variance(state, sampler), "var": state.var,
            **{k: getattr(state.prediction, k) for k in ("eps", "var_epistemic", "var_aleatoric")},
        }
        entry = {"step": state.step, "t": state.t[:n].cpu().clone()}
        entry.update({k: sources[k][:n].detach().cpu().clone() for k in self.keys})
        records.append(entry)
