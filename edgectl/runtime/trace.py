"""Timing spans of one run (load, prefill, decode), recorded by the runtime and reported by run and bench."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Span:
    lane: str  # "load", "compute", ...
    name: str  # "prefill", "decode", "load_method", "layer.3", ...
    start: float
    end: float


@dataclass
class Trace:
    """Spans on lanes, times in seconds from the trace's origin."""

    origin: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)

    def span(self, lane: str, name: str):
        return _SpanCtx(self, lane, name)

    def to_dict(self) -> dict:
        return {"spans": [s.__dict__ for s in self.spans]}

    def total(self, lane: str) -> float:
        return sum(s.end - s.start for s in self.spans if s.lane == lane)


class _SpanCtx:
    def __init__(self, trace: Trace, lane: str, name: str):
        self.trace, self.lane, self.name = trace, lane, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        o = self.trace.origin
        self.trace.spans.append(Span(self.lane, self.name, self.t0 - o, time.perf_counter() - o))
