"""The bounded queue between a session's model work and its reader.

A reader that falls behind loses decisions and statistics, never replies: past `capacity`
only reply events and the end-of-stream marker get in. Every loss is counted, and an
EventsDropped marker with the count goes in before the next event that is accepted, at the
point of loss. Memory stays bounded because the session stops producing while the queue is
`backlogged` (twice the capacity): its audio then waits, or is dropped and reported, upstream.
"""
from __future__ import annotations

import collections
import threading
import time

from .events import EventsDropped, Finished, ReplyEnded, ReplyStarted, TextDelta

_KEPT_WHEN_FULL = (ReplyStarted, TextDelta, ReplyEnded, Finished)


class EventQueue:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"event queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped = 0  # events lost so far
        self._unreported = 0  # ... not yet announced by an EventsDropped marker

    def put(self, event) -> bool:
        """Queue an event without waiting; False if it was dropped (or the queue is closed)."""
        with self._ready:
            if self._closed:
                return False
            if len(self._items) >= self.capacity and not isinstance(event, _KEPT_WHEN_FULL):
                self.dropped += 1
                self._unreported += 1
                return False
            if self._unreported:
                self._items.append(EventsDropped(event.stream_time, time.monotonic(), self._unreported))
                self._unreported = 0
            self._items.append(event)
            self._ready.notify()
            return True

    def get(self, timeout: float | None):
        """The next event, waiting up to `timeout` seconds (None: until one comes or the queue
        is closed); None if there is none."""
        with self._ready:
            if not self._items and not self._closed and timeout != 0:
                self._ready.wait_for(lambda: self._items or self._closed, timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Wake every reader; what is queued can still be taken."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def backlogged(self) -> bool:
        """The reader is so far behind that the producer should wait for it."""
        return len(self._items) >= 2 * self.capacity

    def __len__(self) -> int:
        return len(self._items)
