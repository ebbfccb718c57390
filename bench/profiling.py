"""Profiles under load: py-spy on another process, cProfile in this one; top costs written to files.

``python -m bench --profile STAGE`` sets a :class:`Profiler` on the run; stages call
:meth:`Profiler.attach` with the pids of the processes that carry their load while the measured
window runs, and wrap in-process work with :meth:`Profiler.in_process`.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import top_costs


def py_spy_path() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    out_dir: Path
    stamp: str
    seconds: float = 10.0
    reports: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _running: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def attach(self, name: str, pid: int, seconds: float | None = None) -> None:
        """Start sampling ``pid`` for ``seconds`` (py-spy, collapsed stacks); :meth:`collect` reads it."""
        spy = py_spy_path()
        if spy is None:
            self.problems.append(f"{name}: py-spy is not installed (pip install py-spy); no profile")
            return
        raw = self.out_dir / f"profile-{self.stamp}-{name}.collapsed"
        process = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds or self.seconds))),
             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._running.append((name, process, raw))

    def collect(self, timeout: float = 60.0) -> None:
        for name, process, raw in self._running:
            try:
                _, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if not raw.exists():
                self.problems.append(f"{name}: py-spy wrote no profile ({err.decode(errors='replace')[-300:]})")
                continue
            self._write_top(name, raw.read_text(), f"py-spy, {raw.name}")
        self._running.clear()

    @contextlib.contextmanager
    def in_process(self, name: str) -> Iterator[None]:
        profile = cProfile.Profile()
        profile.enable()
        try:
            yield
        finally:
            profile.disable()
            stream = io.StringIO()
            stats = pstats.Stats(profile, stream=stream)
            stats.sort_stats("tottime").print_stats(25)
            path = self.out_dir / f"profile-{self.stamp}-{name}.txt"
            path.write_text(stream.getvalue())
            self.reports.append(path)

    def _write_top(self, name: str, collapsed: str, source: str) -> None:
        costs = top_costs(collapsed, limit=25)
        lines = [f"# {name}: top costs by self time ({source})", "self%   total%  function"]
        lines += [f"{c.self_fraction * 100:5.1f}  {c.total_fraction * 100:6.1f}  {c.frame}" for c in costs]
        path = self.out_dir / f"profile-{self.stamp}-{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        self.reports.append(path)
