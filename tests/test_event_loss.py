"""A reader that falls behind loses decisions and statistics, never replies, and the stream
says where and how much it lost."""
from __future__ import annotations

import numpy as np
from test_runtime_engine import ScriptedSampler
from test_runtime_fixtures import TOKENS, runtime_package  # noqa: F401

import listenloop
from listenloop.event_queue import EventQueue
from listenloop.events import Decision, EventsDropped, Finished, ReplyEnded

T = TOKENS


class EveryThird(ScriptedSampler):
    """Speaks on chunks 0, 3, 6, ... and replies with the script."""

    def __init__(self, script):
        super().__init__(script)
        self.decisions = 0

    def decide(self, silence_logit, speak_logit):
        self.decisions += 1
        return self.decisions % 3 == 1


def test_an_unread_session_keeps_every_reply_and_marks_each_loss(runtime_package):  # noqa: F811
    """Replies on every third chunk, nobody reading until the end: the decisions that do not
    fit are dropped and marked, every reply arrives."""
    rt = listenloop.Runtime(runtime_package, sampler=EveryThird([T["NORMAL"], ord("o"), ord("k"), T["TEXT_END"]]))
    chunks = 90
    with rt.session(event_queue=40, stats_every=5) as s:
        s.accept_waveform(np.zeros(chunks * 6400, np.float32))
        s.finish(timeout=60)
        dropped = s.stats().dropped_events
        events = list(s.events())
    replies = [e for e in events if isinstance(e, ReplyEnded)]
    assert [r.chunk for r in replies] == list(range(0, chunks, 3)) and all(r.text == "ok" for r in replies)
    markers = [e for e in events if isinstance(e, EventsDropped)]
    assert dropped > 0 and sum(m.count for m in markers) == dropped
    assert isinstance(events[-1], Finished) and events[-1].chunks == chunks


def test_a_reader_that_never_reads_pauses_its_session_instead_of_growing(runtime_package):  # noqa: F811
    """Replies on every chunk and nobody reads: the session stops at twice the queue's
    capacity; finish() returns instead of waiting forever; reading lets it finish."""
    script = [ord("o"), T["TEXT_END"]]
    rt = listenloop.Runtime(runtime_package, sampler=ScriptedSampler(script), speak_threshold=0.0)
    with rt.session(event_queue=10) as s:
        s.accept_waveform(np.zeros(40 * 6400, np.float32))
        s.finish(timeout=30)  # returns: the session is paused for its reader
        backlog = len(s._events)
        assert 20 <= backlog <= 20 + 4  # twice the capacity, plus the rest of the reply in flight
        assert s.stats().chunks < 40
        events = list(s.events(timeout=5))  # reading lets it go on, up to Finished
    assert isinstance(events[-1], Finished) and events[-1].chunks == 40
    assert len([e for e in events if isinstance(e, ReplyEnded)]) == 40


def test_the_queue_keeps_replies_drops_the_rest_and_marks_it():
    q = EventQueue(4)
    for i in range(4):
        q.put(Decision(0.4 * i, 0.0, i, False, 0.0))
    assert not q.put(Decision(1.6, 0.0, 4, False, 0.0))  # full: dropped
    assert q.put(ReplyEnded(2.0, 0.0, 4, "x"))  # replies always get in, after the marker
    assert q.dropped == 1 and not q.backlogged
    items = [q.get(0) for _ in range(len(q))]
    assert [type(i) for i in items[-2:]] == [EventsDropped, ReplyEnded] and items[-2].count == 1
    for i in range(8):
        q.put(ReplyEnded(0.4 * i, 0.0, i, "x"))
    assert q.backlogged
