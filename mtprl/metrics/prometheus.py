"""Prometheus endpoint for rollout metrics (``actor_rollout_ref.rollout.prometheus``).

Serves ``/metrics`` on ``host:port`` (127.0.0.1 unless configured otherwise) from a private
registry, so several exporters can live in one process (tests) without clashing.
Gauges hold the latest value of each metric; names are ``mtprl_`` + the metric key with every
non-alphanumeric character replaced by ``_`` (``rollout/spec_accept_length`` ->
``mtprl_rollout_spec_accept_length``).
"""

from __future__ import annotations

import re
from typing import Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server


def prometheus_name(key: str) -> str:
    return "mtprl_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class PrometheusExporter:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve Prometheus metrics on {host}:{port} ({e.strerror}); set "
                          "actor_rollout_ref.rollout.prometheus.port to a free port") from None
        self.port = self.server.server_port

    def update(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            name = prometheus_name(key)
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, f"mtprl metric {key}", registry=self.registry)
            self._gauges[name].set(float(value))
        if step is not None:
            self.update({"trainer/step": float(step)})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
