"""The bounded queue between a session's model work and its reader, and the wake-up both use.

A reader that falls behind loses decisions and statistics, never replies: past `capacity`
only reply events and the end-of-stream marker get in. Every loss is counted, and an
EventsDropped marker with the count goes in before the next event that is accepted, at the
point of loss. Memory stays bounded because the session stops producing while the queue is
`backlogged` (twice the capacity): its audio then waits, or is dropped and reported, upstream.

Interrupt safety: a reader may get a KeyboardInterrupt (or any exception from a signal
handler) at any bytecode. So a lock is only ever taken by `with` on a plain `threading.Lock`,
whose acquire and release are C calls that the `with` statement pairs without a gap, and
nobody waits while holding it: a waiter registers a private `queue.SimpleQueue` under the
lock, then blocks on that queue alone (a C wait that a signal ends without leaving anything
held). A notifier only puts into those queues, which never blocks; a waiter that was
interrupted leaves at worst a stale entry that is notified and forgotten. The model thread
therefore never waits for a reader, whatever happened to the reader.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from .events import EventsDropped, Finished, ReplyEnded, ReplyStarted, TextDelta

_KEPT_WHEN_FULL = (ReplyStarted, TextDelta, ReplyEnded, Finished)


class Wakeup:
    """Threads that wait for "something changed" (like `Condition.wait`/`notify_all`), built so
    that no waiter can leave anything held (see the module docstring). Waiters recheck their
    condition after waking: wake-ups may be spurious."""

    def __init__(self, lock: threading.Lock | None = None):
        self.lock = lock if lock is not None else threading.Lock()
        self._waiters: list[queue.SimpleQueue] = []

    def wait(self, timeout: float | None, ready=None) -> None:
        """Wait up to `timeout` seconds (None: no limit) for notify_all(). `ready`, checked under
        the lock before waiting, returns at once when true: no notification is missed between
        the check and the wait."""
        with self.lock:
            if ready is not None and ready():
                return
            waiter = self._register()
        self._block(waiter, timeout)

    def notify_all(self) -> None:
        with self.lock:
            self._notify_locked()

    # with `lock` held:
    def _register(self) -> queue.SimpleQueue:
        waiter = queue.SimpleQueue()
        self._waiters.append(waiter)
        return waiter

    def _notify_locked(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.put(None)  # never blocks

    # without it:
    def _block(self, waiter: queue.SimpleQueue, timeout: float | None) -> None:
        try:
            waiter.get(timeout=timeout if timeout is None else max(timeout, 0.0))
        except queue.Empty:
            pass
        finally:
            with self.lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


class EventQueue:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"event queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._ready = Wakeup()
        self._lock = self._ready.lock
        self._closed = False
        self.dropped = 0  # events lost so far
        self._unreported = 0  # ... not yet announced by an EventsDropped marker

    def put(self, event) -> bool:
        """Queue an event without waiting; False if it was dropped (or the queue is closed)."""
        with self._lock:
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
            self._ready._notify_locked()
            return True

    def get(self, timeout: float | None):
        """The next event, waiting up to `timeout` seconds (None: until one comes or the queue
        is closed); None if there is none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._closed or (remaining is not None and remaining <= 0):
                    return None
                waiter = self._ready._register()
            self._ready._block(waiter, remaining)

    def close(self) -> None:
        """Wake every reader; what is queued can still be taken."""
        with self._lock:
            self._closed = True
            self._ready._notify_locked()

    @property
    def backlogged(self) -> bool:
        """The reader is so far behind that the producer should wait for it."""
        return len(self._items) >= 2 * self.capacity

    def __len__(self) -> int:
        return len(self._items)
