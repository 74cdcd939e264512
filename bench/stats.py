"""Summary statistics over raw timing samples.

`Stats.of(samples)` keeps the samples and exposes the usual summary fields
(median, IQR, mean, std, min, max, n). Quartiles use linear interpolation
between order statistics (numpy's default, Hyndman & Fan type 7), and std is
the sample standard deviation (ddof=1), as in pytest-benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A row is flagged noisy when its interquartile range is this large a share of
# its median: the spread is then big enough to hide a 10% regression.
NOISY_IQR_RATIO = 0.10


@dataclass(frozen=True)
class Stats:
    samples: tuple[float, ...]
    unit: str = "ms"

    @classmethod
    def of(cls, samples: Sequence[float], unit: str = "ms") -> "Stats":
        assert len(samples) > 0, "Stats needs at least one sample"
        return cls(tuple(float(s) for s in samples), unit)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def q1(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q3(self) -> float:
        return float(np.percentile(self.samples, 75))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples))

    @property
    def std(self) -> float:
        return float(np.std(self.samples, ddof=1)) if self.n > 1 else 0.0

    @property
    def min(self) -> float:
        return float(np.min(self.samples))

    @property
    def max(self) -> float:
        return float(np.max(self.samples))

    @property
    def noisy(self) -> bool:
        return self.median > 0 and self.iqr / self.median >= NOISY_IQR_RATIO

    def columns(self, prefix: str = "") -> dict[str, float | int | bool]:
        """The CSV columns, units in their names: median_ms, iqr_ms, ..."""
        u = self.unit
        return {
            f"{prefix}median_{u}": self.median,
            f"{prefix}iqr_{u}": self.iqr,
            f"{prefix}mean_{u}": self.mean,
            f"{prefix}std_{u}": self.std,
            f"{prefix}min_{u}": self.min,
            f"{prefix}max_{u}": self.max,
            f"{prefix}n": self.n,
            f"{prefix}noisy": self.noisy,
        }


def stat_columns(prefix: str = "", unit: str = "ms") -> list[str]:
    """The names `Stats.columns` produces, for CSV headers written up front."""
    return list(Stats.of([1.0], unit).columns(prefix))
