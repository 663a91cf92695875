"""A Ray Serve replica's ServerMetrics on Ray's own metrics endpoint.

Ray Serve's replicas cannot each be scraped on one port, so every listenloop_* metric of a
replica is recorded twice: in its own prometheus_client registry (as `listenloop serve` keeps
it) and on a `ray.serve.metrics` twin, which Ray exports from each node's metrics agent as
ray_listenloop_* with Serve's application, deployment and replica tags (docs/SERVE.md, "Many
replicas (Ray Serve)"). Only cluster.py imports this module.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from ray.serve import metrics as serve_metrics

from .metrics import ServerMetrics


class RayServerMetrics(ServerMetrics):
    """ServerMetrics whose every change is also made on its Ray twin. The gauges that are
    read when scraped (the model queue) are sent to Ray by `refresh()`."""

    def __init__(self, runtime=None):
        self._read_when_scraped: list[_Twin] = []
        super().__init__(None, runtime)

    def _new(self, kind, name: str, documentation: str, labels=(), **options):
        local = super()._new(kind, name, documentation, labels, **options)
        if kind is Histogram:
            twin = serve_metrics.Histogram(name, documentation, boundaries=list(options["buckets"]),
                                           tag_keys=tuple(labels))
        else:
            twin = {Counter: serve_metrics.Counter, Gauge: serve_metrics.Gauge}[kind](name, documentation,
                                                                                      tag_keys=tuple(labels))
        return _Twin(local, twin, tuple(labels), self._read_when_scraped)

    def refresh(self) -> None:
        """Send Ray the values that prometheus_client reads only when scraped."""
        for twin in self._read_when_scraped:
            twin.refresh()


class _Twin:
    """A prometheus_client metric (or one labelled child) and its ray.serve.metrics twin."""

    def __init__(self, local, remote, label_names: tuple, read_when_scraped: list, tags: dict | None = None):
        self.local, self.remote = local, remote
        self.label_names = label_names
        self.tags = tags or {}
        self._read_when_scraped = read_when_scraped
        self._children: dict = {}
        self._value = 0.0  # a gauge's value: Ray's gauges are only ever set
        self._function = None

    def labels(self, *values) -> _Twin:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Twin(self.local.labels(*values), self.remote, (),
                                                   self._read_when_scraped, dict(zip(self.label_names, values)))
        return child

    def inc(self, amount: float = 1) -> None:
        self.local.inc(amount)
        if isinstance(self.remote, serve_metrics.Gauge):
            self._set_remote(self._value + amount)
        elif amount > 0:  # (Ray refuses an increment of zero)
            self.remote.inc(amount, tags=dict(self.tags))

    def dec(self, amount: float = 1) -> None:
        self.local.dec(amount)
        self._set_remote(self._value - amount)

    def set(self, value: float) -> None:
        self.local.set(value)
        self._set_remote(value)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.remote.observe(value, tags=dict(self.tags))

    def set_function(self, function) -> None:
        self.local.set_function(function)
        self._function = function
        self._read_when_scraped.append(self)

    def refresh(self) -> None:
        if self._function is not None:
            self._set_remote(self._function())

    def _set_remote(self, value: float) -> None:
        self._value = float(value)
        self.remote.set(self._value, tags=dict(self.tags))
