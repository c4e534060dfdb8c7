"""What every worker process shares: signals, readiness, and the metrics/health HTTP endpoint.

Workers run a loop until ``service.stopping`` is set (SIGTERM or SIGINT); they finish or abort
the batch in hand, commit or abort its transaction, and exit 0.

Readiness (``/readyz``) is honest: 200 only while the worker has started (``ready``), is not
stopping, and every one of its ``checks`` (each returns why it cannot work, or None) passes;
otherwise 503 with the reasons. A Kafka worker checks its clients' statistics (a broker
connection up, its group's assignment steady, its loop polling: :mod:`pipeline.kafka.health`);
the SMTP ingress also whether the broker acknowledges what it sends.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from pipeline.core import log
from pipeline.core.config import Settings


def metrics_text() -> bytes:
    """This process's metrics; with several processes behind one endpoint (the SMTP ingress's
    session processes, ``PROMETHEUS_MULTIPROC_DIR``), all of theirs."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def freeze_start_up() -> None:
    """Call once start-up is done, before the work loop: what start-up loaded (modules, the model,
    a benchmark's plan) lives as long as the process, so take it out of the cyclic collector's
    reach (``gc.freeze``). A full collection then walks only what the loop allocated. Measured in
    a flood run: with ~120,000 start-up objects the priority classifier's full collections took
    65-80 ms with the GIL held, a stall for the batch in hand; frozen, under 1 ms (deliver 22 ms
    to 0.4 ms). Objects created later (a hot-reloaded model) are collected as usual."""
    gc.freeze()


class Service:
    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.stopping = threading.Event()
        self.ready = threading.Event()  # started: set once, by the worker
        self.checks: list[Callable[[], str | None]] = []  # each: why it cannot work now, or None
        self.log = log.get(name)
        self._http: ThreadingHTTPServer | None = None

    def not_ready(self) -> list[str]:
        """Why ``/readyz`` answers 503 now (empty: ready)."""
        if self.stopping.is_set():
            return ["stopping"]
        if not self.ready.is_set():
            return ["starting"]
        return [p for p in (check() for check in self.checks) if p]

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.log.info("stopping", extra={"signal": signal.Signals(signum).name})
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve_http(self, port: int | None = None) -> int | None:
        """Serve /metrics, /healthz and /readyz on the configured host (loopback by default).

        With no ``port`` the configured one is used, and a configured 0 means no endpoint; an
        explicit ``port=0`` binds an ephemeral port (tests). Returns the bound port.
        """
        if port is None:
            port = self.settings.worker.metrics_port
            if port == 0:
                return None
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = metrics_text(), CONTENT_TYPE_LATEST, 200
                elif self.path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif self.path == "/readyz":
                    problems = service.not_ready()
                    body = ("ready\n" if not problems else "not ready: " + "; ".join(problems) + "\n").encode()
                    ctype, code = "text/plain", 503 if problems else 200
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer((self.settings.worker.metrics_host, port), Handler)
        threading.Thread(target=self._http.serve_forever, name="http", daemon=True).start()
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
