"""Pure arithmetic of the benchmark: Prometheus text, histogram quantiles, medians, profiles.

Nothing here does I/O, so every number the table prints can be checked by a unit test that
feeds it plain text or plain lists.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Quantile",
    "Sample",
    "bucket_quantile",
    "counter_value",
    "diff_buckets",
    "exact_quantile",
    "histogram_buckets",
    "median",
    "parse_samples",
    "top_costs",
]

# name{labels} value [timestamp]; label values may contain escaped quotes.
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, name: str) -> str | None:
        for key, value in self.labels:
            if key == name:
                return value
        return None


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition; comments and malformed lines are skipped."""
    samples: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = tuple(_LABEL_RE.findall(m.group(3) or ""))
        samples.append(Sample(m.group(1), labels, value))
    return samples


def counter_value(text: str, name: str, **labels: str) -> float:
    """Sum of a counter (or gauge) over every label set matching ``labels``; 0 when absent.

    ``name`` may be given with or without the ``_total`` suffix.
    """
    names = {name, name + "_total"} if not name.endswith("_total") else {name}
    total = 0.0
    for sample in parse_samples(text):
        if sample.name in names and all(sample.label(k) == v for k, v in labels.items()):
            total += sample.value
    return total


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts ``{upper bound: count}`` of histogram ``name``, summed over label sets."""
    buckets: dict[float, float] = {}
    for sample in parse_samples(text):
        if sample.name != name + "_bucket":
            continue
        le = sample.label("le")
        if le is None:
            continue
        bound = math.inf if le in ("+Inf", "Inf", "inf") else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def diff_buckets(after: Mapping[float, float], before: Mapping[float, float]) -> dict[float, float]:
    """What was observed between two scrapes. A bucket that went down means the process restarted."""
    out: dict[float, float] = {}
    for bound, count in after.items():
        delta = count - before.get(bound, 0.0)
        if delta < 0:
            raise ValueError(f"bucket le={bound} went down ({before.get(bound)} -> {count}): process restarted?")
        out[bound] = delta
    return out


@dataclass(frozen=True, slots=True)
class Quantile:
    """A quantile estimated from buckets. ``above_range``: it lies in the +Inf bucket, so ``value`` is
    only a lower bound (the largest finite bound)."""

    q: float
    value: float
    above_range: bool = False


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> Quantile | None:
    """Quantile ``q`` (0..1) of cumulative buckets, interpolated linearly inside the bucket that holds it,
    as Prometheus' ``histogram_quantile`` does (the first bucket starts at 0). ``None`` with no observations.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, not {q}")
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if bounds[-1] != math.inf:
        raise ValueError("buckets need a +Inf bucket (the total count)")
    counts = [buckets[b] for b in bounds]
    if any(later < earlier for earlier, later in zip(counts, counts[1:], strict=False)):
        raise ValueError("bucket counts must be cumulative (non-decreasing)")
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > 0:
            if bound == math.inf:
                finite = [b for b in bounds if b != math.inf]
                return Quantile(q, finite[-1] if finite else 0.0, above_range=True)
            in_bucket = count - previous_count
            if in_bucket <= 0:
                return Quantile(q, bound)
            return Quantile(q, previous_bound + (bound - previous_bound) * (rank - previous_count) / in_bucket)
        previous_bound, previous_count = bound, count
    return None  # unreachable: the +Inf bucket holds every rank


def exact_quantile(q: float, values: Sequence[float]) -> float | None:
    """Quantile of raw observations (nearest rank); ``None`` for no data."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (``None`` ignored)."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    mid = len(data) // 2
    if len(data) % 2:
        return data[mid]
    return (data[mid - 1] + data[mid]) / 2


@dataclass(frozen=True, slots=True)
class Cost:
    frame: str
    self_fraction: float
    total_fraction: float


def top_costs(collapsed: str, limit: int = 15) -> list[Cost]:
    """Top functions of a profile in collapsed-stack form (``a;b;c 42`` per line, as py-spy ``--format raw``
    writes): ordered by self time, with inclusive time alongside, both as fractions of all samples."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for raw in collapsed.splitlines():
        line = raw.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    if not samples:
        return []
    return [
        Cost(frame, count / samples, total_counts[frame] / samples)
        for frame, count in self_counts.most_common(limit)
    ]
