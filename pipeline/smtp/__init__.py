"""SMTP ingress (``floodgate smtp``): accept mail for our domains and make it a durable event.

A message gets ``250`` only once the broker has acknowledged its event on its lane's topic
(``acks=all``, idempotent producer), so nothing that got a 250 can be lost. When the broker
is unreachable or slow, the reply is ``451 4.3.0`` and the sending server retries later: mail
waits in the sender's queue, never in ours.

Policy, in SMTP terms:

* RCPT to a domain outside ``settings.smtp.domains`` -> ``550 5.7.1`` (never an open relay);
  more than ``max_recipients`` -> ``452 4.5.3`` (RFC 5321 4.5.3.1.8: the client sends the rest
  in another transaction);
* ``SIZE`` is advertised; a declared or actual size above ``max_message_bytes`` -> ``552 5.3.4``
  (the body is read to its end and discarded, never truncated);
* a connection may carry at most ``max_messages_per_connection`` messages, then ``421 4.7.0``;
  at most ``max_connections`` sessions are open at once, further clients get ``421 4.7.0``;
* SMTPUTF8 is on: internationalised addresses are accepted for local domains, in a transaction
  whose MAIL FROM carries the SMTPUTF8 parameter (RFC 6531), else ``553 5.6.7``. Addresses are
  compared and stored normalised: the domain as IDNA (UTS #46 mapping: case, fullwidth forms,
  ideographic full stops) after NFC, the local part NFC; an address with a control character
  (NUL included) or an invisible one (zero-width, soft hyphen, bidirectional marks: Unicode
  format characters) is refused with ``553``, so that no lookalike reaches a mailbox no user reads;
* sender authentication (``[auth]``, on by default; :mod:`pipeline.smtp.auth`): SPF for MAIL FROM
  (and HELO when MAIL FROM did not pass) from the first accepted RCPT, overlapping DATA; DKIM, ARC
  and DMARC at the end of DATA; all of it adds at most ``auth.budget_s`` to a message (past it:
  ``temperror``, never ``pass``). ``Authentication-Results`` fields claiming our authserv-id are
  removed, ours is prepended, and the results go into the event (``extra["auth"]``,
  :mod:`pipeline.core.authres`);
* admission: mail from a source that floods goes to the bulk lane's topic, everything else to
  ``inbound`` (:mod:`pipeline.admission`), before it is queued anywhere. A known-good sender's
  exemption applies only to the names the message proved.
* per-client limits at the socket (:mod:`pipeline.smtp.limits`): connections per client and
  network, connection and message rates, and under stress a bounded share for clients without
  history, with shorter idle and error limits; a refused client gets ``421`` at connect or
  ``450`` at MAIL FROM, before its body is read;
* XFORWARD from the relays named in ``smtp.xforward_hosts`` (an MTA in front): limits and
  admission then see the client and HELO the relay saw, not the relay.

The package: :mod:`~pipeline.smtp.protocol` (the SMTP conversation), :mod:`~pipeline.smtp.addresses`
(paths, parameters, normalisation), :mod:`~pipeline.smtp.limits` (per-client limits and stress),
:mod:`~pipeline.smtp.bridge` (the hand-off to Kafka), :mod:`~pipeline.smtp.auth` (SPF, DKIM, ARC,
DMARC over a cached asynchronous DNS path), :mod:`~pipeline.smtp.server` (one ingress process),
:mod:`~pipeline.smtp.front` (several session processes behind one port).
"""

from __future__ import annotations

from pipeline.core.config import Settings
from pipeline.core.service import Service, freeze_start_up
from pipeline.smtp.addresses import normalize_domain
from pipeline.smtp.protocol import LINE_LENGTH_LIMIT
from pipeline.smtp.server import SmtpIngress

__all__ = ["LINE_LENGTH_LIMIT", "SmtpIngress", "normalize_domain", "run"]


def run(settings: Settings, service: Service) -> None:
    """``floodgate smtp``: serve until SIGTERM/SIGINT, then finish in-flight acks and exit."""
    ingress = SmtpIngress(settings)
    ingress.start()
    if ingress.verifier is not None:
        ingress.verifier.wait_warm()  # the worker process for big messages, before readiness
    service.checks.append(ingress.bridge.problem)
    freeze_start_up()
    service.ready.set()
    try:
        service.stopping.wait()
    finally:
        service.ready.clear()
        ingress.stop()
        service.close()
