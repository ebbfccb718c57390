"""Pure arithmetic of the benchmark: Prometheus text, histogram quantiles, medians and spreads,
the knee of a rate sweep, memory drift over a soak, pause summaries, profiles.

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
    "Drift",
    "Knee",
    "PauseSummary",
    "Quantile",
    "Sample",
    "Spread",
    "SweepStep",
    "bucket_quantile",
    "capacity_within",
    "counter_value",
    "diff_buckets",
    "exact_quantile",
    "find_knee",
    "histogram_buckets",
    "interpolated_quantile",
    "median",
    "parse_samples",
    "rss_drift",
    "segment_drifts",
    "spread",
    "summarize_pauses",
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


def interpolated_quantile(q: float, values: Sequence[float]) -> float | None:
    """Quantile with linear interpolation between order statistics (numpy's default, 'type 7');
    used for quartiles of a handful of repeats, where nearest rank would jump between samples."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, not {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """How far the repeats of one figure lie apart. The verdict is taken on ``median``; ``relative``
    (max - min over the median) says how much one run alone could have misled."""

    n: int
    minimum: float
    q1: float
    median: float
    q3: float
    maximum: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative(self) -> float | None:
        if self.median == 0:
            return None
        return (self.maximum - self.minimum) / abs(self.median)


def spread(values: Iterable[float | None]) -> Spread | None:
    """Min, quartiles, median, max of the measured repeats (``None`` and NaN ignored); ``None`` for none."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    mid = median(data)
    q1 = interpolated_quantile(0.25, data)
    q3 = interpolated_quantile(0.75, data)
    assert mid is not None and q1 is not None and q3 is not None
    return Spread(len(data), data[0], q1, mid, q3, data[-1])


# ---- a rate sweep: where latency turns up -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepStep:
    """One step of a rate sweep: what was offered, what came through, the tail there, what was lost."""

    offered: float
    sustained: float
    p99: float | None
    dropped: float = 0.0

    def holds(self, p99_limit: float, min_share: float = 0.95) -> bool:
        """Sustained (at least ``min_share`` of the offer), nothing dropped, p99 within ``p99_limit``."""
        return (self.p99 is not None and self.p99 <= p99_limit and self.dropped <= 0
                and self.sustained >= min_share * self.offered)


@dataclass(frozen=True, slots=True)
class Knee:
    """``last_good``: the highest step before latency turned up (``None``: the first step already had);
    ``first_bad``: the step where it did (``None``: it never did within the sweep); ``reason`` says why."""

    last_good: SweepStep | None
    first_bad: SweepStep | None
    reason: str


def find_knee(steps: Sequence[SweepStep], *, factor: float = 3.0, floor: float = 0.005,
              min_share: float = 0.95) -> Knee:
    """The knee of a sweep, ordered by offered rate: the first step whose p99 exceeds ``factor`` x the
    lowest step's p99 (and ``floor``, so that 1 ms -> 3 ms on an idle pipeline is not called a knee),
    or that could not carry ``min_share`` of its offer, or dropped anything."""
    ordered = sorted(steps, key=lambda s: s.offered)
    if not ordered:
        return Knee(None, None, "no steps")
    reference = ordered[0].p99
    last_good: SweepStep | None = None
    for step in ordered:
        if step.dropped > 0:
            return Knee(last_good, step, f"{step.dropped:.0f} dropped at {step.offered:.0f}/s")
        if step.sustained < min_share * step.offered:
            return Knee(last_good, step, f"carried {step.sustained:.0f} of {step.offered:.0f}/s offered")
        if step.p99 is None:
            return Knee(last_good, step, f"no latency observed at {step.offered:.0f}/s")
        if reference is not None and step.p99 > max(factor * reference, floor):
            return Knee(last_good, step, f"p99 {step.p99 * 1e3:.1f} ms > {factor:g}x the "
                                         f"{ordered[0].offered:.0f}/s step's {reference * 1e3:.1f} ms")
        last_good = step
    return Knee(last_good, None, "latency did not turn up within the sweep")


def capacity_within(steps: Sequence[SweepStep], p99_limit: float, min_share: float = 0.95) -> float | None:
    """The highest sustained rate among the steps that held (see :meth:`SweepStep.holds`), counting
    only steps below the first one that did not: a lucky step past the knee does not count."""
    best: float | None = None
    for step in sorted(steps, key=lambda s: s.offered):
        if not step.holds(p99_limit, min_share):
            break
        best = step.sustained
    return best


# ---- a soak: does memory stay flat --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """RSS change over a soak: ``start``/``end`` are medians of the first and last ``edge`` share of the
    samples after warm-up, ``relative`` is (end - start) / start; ``slope_per_hour`` is the least-squares
    trend as a share of ``start`` per hour (a leak shows as a steady positive slope)."""

    start: float
    end: float
    relative: float
    slope_per_hour: float
    samples: int

    def flat_within(self, tolerance: float) -> bool:
        return abs(self.relative) <= tolerance


def rss_drift(samples: Sequence[tuple[float, float]], *, warmup: float = 0.0, edge: float = 0.2) -> Drift | None:
    """Drift of ``(seconds, bytes)`` samples of one process; samples before ``warmup`` seconds (after the
    first sample) are left out, as the heap grows to its working size then. ``None`` below 4 samples."""
    if not 0.0 < edge <= 0.5:
        raise ValueError(f"edge must be within (0, 0.5], not {edge}")
    if not samples:
        return None
    t0 = min(t for t, _ in samples)
    kept = sorted((t, v) for t, v in samples if t - t0 >= warmup)
    if len(kept) < 4:
        return None
    width = max(1, round(len(kept) * edge))
    start = median(v for _, v in kept[:width])
    end = median(v for _, v in kept[-width:])
    assert start is not None and end is not None
    if start <= 0:
        raise ValueError("RSS samples must be positive")
    mean_t = sum(t for t, _ in kept) / len(kept)
    mean_v = sum(v for _, v in kept) / len(kept)
    var_t = sum((t - mean_t) ** 2 for t, _ in kept)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in kept) / var_t if var_t > 0 else 0.0
    return Drift(start, end, (end - start) / start, slope * 3600.0 / start, len(kept))


def segment_drifts(samples: Sequence[tuple[float, float]], *, warmup: float = 0.0, parts: int = 3,
                   edge: float = 0.2) -> list[Drift]:
    """:func:`rss_drift` of each of ``parts`` equal stretches of time after ``warmup``: whether the growth of a
    soak is steady (every stretch grows: a leak) or one step (one stretch grows, the others are flat). Stretches
    with too few samples are left out."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, not {parts}")
    if not samples:
        return []
    t0 = min(t for t, _ in samples)
    kept = sorted((t, v) for t, v in samples if t - t0 >= warmup)
    if not kept:
        return []
    first, last = kept[0][0], kept[-1][0]
    width = (last - first) / parts
    if width <= 0:
        return []
    drifts: list[Drift] = []
    for i in range(parts):
        low, high = first + i * width, first + (i + 1) * width
        inside = [(t, v) for t, v in kept if low <= t < high or (i == parts - 1 and t == high)]
        drift = rss_drift(inside, edge=edge)
        if drift is not None:
            drifts.append(drift)
    return drifts


# ---- pauses: GC and event-loop lag --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PauseSummary:
    count: int
    total: float
    maximum: float
    p99: float | None
    over: int  # pauses longer than the threshold asked for

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def summarize_pauses(pauses: Iterable[float], over: float = 0.005) -> PauseSummary:
    """Count, total, max, p99 of pause durations (seconds) and how many exceeded ``over``."""
    data = sorted(p for p in pauses if p >= 0)
    return PauseSummary(len(data), sum(data), data[-1] if data else 0.0, exact_quantile(0.99, data),
                        sum(1 for p in data if p > over))


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
