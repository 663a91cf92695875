"""One thread that makes every model call for the open sessions of a Runtime.

Each round it gives every session with work one unit: one chunk's listening step (encoder
and decoder call) or one reply token. So sessions are served fairly, each in its own order,
and a session never waits behind another session's reply for longer than one decoder call.
Without slots, calls are never batched across chunks or sessions, which keeps each stream's
numbers a function of its own audio alone (docs/DESIGN.md, "Determinism").

With a SlotPool (a profile with `"slots"`), a round is one encoder call and one decoder call
for every session: each session with work starts its unit (its generator runs up to the point
where its cache waits for a shared call), the pool encodes every staged chunk at once, resumes
those units, runs the decoder step, and resumes every unit that waited for it. A unit that
needs several steps (a prompt or a re-prefill, 13 rows per step) stays in flight across rounds
while the others go on, so no session waits more than one step for its turn. The encoder and
the slot decoder compute every slot's rows by themselves, so a stream's numbers are still a
function of its own audio alone (docs/DESIGN.md, "Fixed-slot batching").

The thread exists while sessions are open and sleeps on one wake signal that every
session's chunk scheduler, finish() and close() post. At interpreter exit every session is
closed and the thread joined before Python finalizes, so no thread is ever stopped while it
is inside a C++ call.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref

log = logging.getLogger("listenloop")

IDLE_WAIT_S = 0.1  # backstop between wake-ups when no session has work
_live_schedulers: weakref.WeakSet = weakref.WeakSet()
_live_sessions: weakref.WeakSet = weakref.WeakSet()


class StreamScheduler:
    def __init__(self, name: str = "listenloop-model", pool=None):
        from . import _core

        self.wake_signal = _core.WakeSignal()
        self._name = name
        self._pool = pool  # a SlotPool: batched rounds
        self._in_flight: dict = {}  # session -> [its unit's generator, the pool's call it waits for]
        # re-entrant: a session collected by the GC in this thread while the lock is held
        # removes itself from its __del__
        self._lock = threading.RLock()
        self._sessions: list[weakref.ref] = []  # in the order they were opened
        self._thread: threading.Thread | None = None
        self._stopping = False
        _live_schedulers.add(self)

    def add(self, session) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("this Runtime is closed")
            self._sessions.append(weakref.ref(session))
            _live_sessions.add(session)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self.wake()

    def remove(self, session) -> None:
        with self._lock:
            self._sessions = [r for r in self._sessions if r() is not None and r() is not session]
        self.wake()

    def wake(self) -> None:
        self.wake_signal.post()

    def sessions(self) -> list:
        with self._lock:
            return [s for s in (r() for r in self._sessions) if s is not None]

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return sum(1 for r in self._sessions if r() is not None)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._sessions = [r for r in self._sessions if r() is not None]
                if self._stopping or not self._sessions:
                    self._thread = None  # a session opened from now on starts a new thread
                    for steps, _ in self._in_flight.values():
                        steps.close()
                    self._in_flight.clear()
                    return
                refs = list(self._sessions)
            worked = self._batched_round(refs) if self._pool is not None else self._round(refs)
            if not worked:
                self.wake_signal.wait(IDLE_WAIT_S)

    @staticmethod
    def _round(refs) -> bool:
        worked = False
        for ref in refs:
            session = ref()
            if session is not None and session._work():
                worked = True
            session = None  # a dropped session is collected here, not kept by this loop
        return worked

    def _batched_round(self, refs) -> bool:
        """Start a unit for every session with work and none in flight, make the shared calls
        the waiting units need (SlotPool.round), and keep the units that wait for later steps."""
        worked = False
        for ref in refs:
            session = ref()
            if session is None or session in self._in_flight:
                continue
            steps = session._work_steps()
            try:
                self._in_flight[session] = [steps, next(steps)]
            except StopIteration as done:
                worked = worked or bool(done.value)
        session = None
        for closed in [s for s in self._in_flight if s.closed]:  # its slot is already given back
            self._in_flight.pop(closed)[0].close()
        if not self._in_flight:
            return worked
        self._pool.round(self._in_flight)  # units that ended leave it
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current unit of work (idempotent)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


@atexit.register
def _close_everything() -> None:
    """Runs before Python finalizes: close every session (microphones, chunk schedulers) and
    join every model thread, so none is left inside a C++ call when the interpreter goes."""
    for session in list(_live_sessions):
        try:
            session.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("closing a session at exit failed", exc_info=True)
    for scheduler in list(_live_schedulers):
        scheduler.close()
