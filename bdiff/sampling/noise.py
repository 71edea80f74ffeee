"""Per-sample random streams: sample i's noise depends only on (seed, i).

Each sample owns a ``torch.Generator`` seeded from (seed, index), advanced only
when that sample draws. The same image therefore comes out whatever the batch
size, chunking, device count or the number of steps other samples take.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the 64-bit seed space


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of run ``seed``."""
    return (seed * _MIX + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class NoiseSource:
    """Standard normal draws per sample: ``draw(shape, rows)`` -> (len(rows), *shape)."""

    def __init__(self, seed: int, indices: Tensor | list[int]) -> None:
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def draw(self, shape: tuple[int, ...], rows: Tensor | None = None, device: torch.device | str = "cpu") -> Tensor:
        """One (C,H,W)-shaped draw for each selected row (default: all rows), stacked."""
        chosen = range(len(self.generators)) if rows is None else [int(r) for r in rows]
        out = torch.stack([torch.randn(shape, generator=self.generators[r]) for r in chosen])
        return out.to(device)
