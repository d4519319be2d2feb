"""What waits for a slot, and how fast the wait goes down.

FairQueue serves clients (API key, else address) in turn, so a client that sends a hundred requests at once delays
each other client by at most one of its requests. A job (the sequences of one request: one, or n choices) is
admitted whole before the next one starts, so its choices can share their prompt (scheduler.py, _fork).

DrainRate turns recent completions into the Retry-After an overloaded refusal carries: how long the queue ahead
takes to drain at the pace slots have been freeing up while there was work (idle spells do not count).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from typing import Callable, Iterator

from .sequence import Sequence

RETRY_AFTER_MAX = 60  # seconds
DRAIN_WINDOW = 32  # completions the rate is measured over


class FairQueue:
    """Start-time fair queuing: each job is stamped, when it arrives, with the later of the current virtual time
    and the end of its client's previous job (a job costs its number of sequences), and the smallest stamp goes
    first. A client that has been waiting, or is new, goes ahead of one that was just served, however many
    requests that one has queued; clients that keep sending share the slots evenly. Only clients with stamps ahead
    of the virtual time are remembered, so memory is bounded by what waits."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[Sequence]]] = []
        self._ends: dict[str, float] = {}  # client -> the stamp its next job starts from, when ahead of `_now`
        self._now = 0.0  # the virtual time: the stamp of the job admitted last
        self._arrivals = itertools.count()  # ties go in arrival order
        self._current: list[Sequence] = []  # the rest of a job being admitted
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Sequence]:
        yield from self._current
        for _, _, job in sorted(self._heap):
            yield from job

    def push(self, job: list[Sequence]) -> None:
        client = job[0].client
        stamp = max(self._now, self._ends.get(client, 0.0))
        self._ends[client] = stamp + len(job)
        heapq.heappush(self._heap, (stamp, next(self._arrivals), list(job)))
        self.size += len(job)

    def pop(self) -> Sequence | None:
        """The next sequence to admit: the rest of the current job, else the job with the smallest stamp."""
        if not self._current:
            if not self._heap:
                return None
            self._now, _, self._current = heapq.heappop(self._heap)
            if len(self._ends) > 2 * len(self._heap) + 16:  # forget clients the virtual time has caught up with
                self._ends = {c: end for c, end in self._ends.items() if end > self._now}
        self.size -= 1
        return self._current.pop(0)

    def remove(self, doomed: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take out every waiting sequence `doomed` says should go (expired, cancelled); return them."""
        removed = [s for s in self if doomed(s)]
        if not removed:
            return removed
        gone = set(map(id, removed))
        self._current = [s for s in self._current if id(s) not in gone]
        kept = ((stamp, n, [s for s in job if id(s) not in gone]) for stamp, n, job in self._heap)
        self._heap = [entry for entry in kept if entry[2]]
        heapq.heapify(self._heap)
        self.size -= len(removed)
        return removed

    def clear(self) -> list[Sequence]:
        everything = list(self)
        self._heap, self._current, self._ends, self.size = [], [], {}, 0
        return everything


class DrainRate:
    """Seconds until `waiting` sequences ahead would have left the queue, at the pace of recent completions.

    The pace is measured in busy time: spells with nothing to do (`idle` until `busy`) are left out, so the first
    refusals after a quiet hour are paced by how fast slots freed while there was work, not by the hour."""

    def __init__(self, window: int = DRAIN_WINDOW) -> None:
        self._ends: collections.deque[float] = collections.deque(maxlen=window)  # on the busy clock
        self._idle_total = 0.0  # seconds spent idle so far (busy clock = time - idle time)
        self._idle_since: float | None = None

    def _busy_clock(self, now: float) -> float:
        idle = self._idle_total + (now - self._idle_since if self._idle_since is not None else 0.0)
        return now - idle

    def idle(self, now: float) -> None:
        """Nothing waits or runs from `now` on."""
        if self._idle_since is None:
            self._idle_since = now

    def busy(self, now: float) -> None:
        """Work arrived at `now`."""
        if self._idle_since is not None:
            self._idle_total += now - self._idle_since
            self._idle_since = None

    def record(self, now: float) -> None:
        self._ends.append(self._busy_clock(now))

    def retry_after(self, waiting: int, now: float) -> int:
        if len(self._ends) < 2:
            return 1  # no pace known yet
        rate = len(self._ends) / max(self._busy_clock(now) - self._ends[0], 1e-3)  # completions per busy second
        return max(1, min(RETRY_AFTER_MAX, math.ceil((waiting + 1) / rate)))
