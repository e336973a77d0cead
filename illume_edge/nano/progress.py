"""A progress bar per training stage and a JSON-lines loss log (no dependency beyond the standard library)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO


class Progress:
    """`update(step, **metrics)` redraws one line on stderr and logs every `log_every`-th step as JSON."""

    def __init__(self, stage: str, total: int, log_path: Path | None = None, *, log_every: int = 10,
                 stream: TextIO | None = None, width: int = 24):
        self.stage, self.total = stage, max(1, total)
        self.log_path, self.log_every = log_path, log_every
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self._smooth: dict[str, float] = {}
        self._last_draw = 0.0

    def update(self, step: int, **metrics: float) -> None:
        for k, v in metrics.items():
            prev = self._smooth.get(k)
            self._smooth[k] = float(v) if prev is None else 0.9 * prev + 0.1 * float(v)
        elapsed = time.perf_counter() - self.t0
        if self.log_path is not None and (step % self.log_every == 0 or step == self.total):
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, "elapsed_s": round(elapsed, 2),
                                    **{k: round(float(v), 5) for k, v in metrics.items()}}) + "\n")
        now = time.perf_counter()
        if now - self._last_draw > 0.2 or step == self.total:
            self._last_draw = now
            done = int(self.width * step / self.total)
            eta = elapsed / step * (self.total - step) if step else 0.0
            shown = " ".join(f"{k}={v:.4g}" for k, v in self._smooth.items())
            self.stream.write(f"\r{self.stage:<14} [{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} "
                              f"{elapsed:5.0f}s eta {eta:4.0f}s {shown}   ")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()

    def note(self, **info) -> None:
        """Log a one-off record (evaluations between stages, timings)."""
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"stage": self.stage, **info}) + "\n")
        self.stream.write(f"{self.stage:<14} " + " ".join(f"{k}={v}" for k, v in info.items()) + "\n")
        self.stream.flush()
