"""``floodgate web``: the quarantine in a browser, for operators and for the recipients of held mail.

A worker like the others: its own process (``pipeline/node.py``'s NODE, a systemd unit, a
Kubernetes Deployment), ``/metrics``, ``/healthz`` and ``/readyz`` on the worker's metrics port,
the application itself on ``web.host:web.port`` (loopback by default: put a TLS-terminating
proxy in front to expose it). It is a Starlette application with Jinja2 templates, served by
uvicorn in a thread of the worker; the worker's main thread waits for SIGTERM, then stops the
server (requests in hand finish) and exits 0.

* **Operators** sign in with their name and the admin token (``FLOODGATE_ADMIN_TOKEN``), then
  search and page through the quarantine, open a message, and release, delete or report
  messages as ham, one or a page at a time, with the lanes' lag and status beside the list.
* **Recipients** need no account: ``floodgate digest`` mails each one a signed, expiring link to
  the messages held for their own address, which they may release when they were its only
  recipients (a message to others too is an operator's to release).

Every page shows hostile mail, so: no script on any page (the content-security policy forbids
it), everything a sender wrote escaped or shown as text, HTML only after a sanitizer inside a
sandboxed iframe under a policy that forbids scripts and remote loads, attachments listed and
never opened, CSRF tokens on every form (:mod:`pipeline.web.security`, :mod:`pipeline.web.message`).
Releases, deletions and reports are :mod:`pipeline.feedback`'s, the command line's path.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading

from pipeline import feedback
from pipeline.core.service import Service

STOP_TIMEOUT_S = 10.0  # requests in hand get this long to finish on SIGTERM (they take milliseconds)


def serve(service: Service) -> None:
    """Run the web worker until ``service.stopping`` is set (SIGTERM or SIGINT)."""
    import uvicorn

    from pipeline.web.app import create_app
    from pipeline.web.status import LaneStatus

    # uvicorn's own start-up lines (ours says the same) carry terminal colour codes as extra fields.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    settings = service.settings
    secret = settings.web.secret_key
    if not secret:
        secret = secrets.token_urlsafe(32)
        service.log.warning("web.secret_key is not set: sessions and recipient links last only as long as this "
                            "process, and digests cannot link here; set FLOODGATE_WEB_SECRET_KEY")
    admin_token = os.environ.get(feedback.TOKEN_ENV, "")
    if not admin_token:
        service.log.warning(f"{feedback.TOKEN_ENV} is not set: operator sign-in is off")
    lanes = LaneStatus(settings)
    app = create_app(settings, secret, admin_token, lanes=lanes)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.web.host, port=settings.web.port, log_config=None,
                                           access_log=False, server_header=False, proxy_headers=False,
                                           lifespan="off", timeout_graceful_shutdown=int(STOP_TIMEOUT_S)))
    thread = threading.Thread(target=server.run, name="web-server", daemon=True)
    service.checks.append(lambda: None if server.started else "web server not listening")
    thread.start()
    service.ready.set()
    service.log.info("web serving", extra={"host": settings.web.host, "port": settings.web.port,
                                           "quarantine_db": str(settings.paths.quarantine_db)})
    try:
        while not service.stopping.wait(0.5):
            if not thread.is_alive():  # could not bind, or died: let the supervisor restart it
                service.log.error("web server stopped on its own")
                raise SystemExit(75)
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S + 5)
        lanes.close()
        service.close()
