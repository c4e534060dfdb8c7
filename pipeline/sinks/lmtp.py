"""Delivery to a downstream mail server over LMTP (RFC 2033) or SMTP.

One transaction per recipient: an LMTP server answers DATA once per accepted recipient, and
``smtplib`` reads only one reply, so several recipients in one transaction would leave replies
unread and desynchronise the session. One recipient per transaction also gives a clear verdict
per recipient.

Outcomes: a 2xx reply is delivered; a 4xx reply, a refused connection, a timeout or a dropped
session raise :class:`TransientError` (the worker retries the batch later and commits nothing);
a 5xx reply raises :class:`Rejected` (the event goes to the dead-letter topic with the reply).
"""

from __future__ import annotations

import contextlib
import re
import smtplib

from pipeline.core.config import DeliverySettings
from pipeline.kafka.loop import TransientError

MODES = ("lmtp", "smtp")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class Rejected(Exception):
    """The downstream server refused the message for good (a 5xx reply)."""


def _reply(code: int, msg: bytes | str) -> str:
    text = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
    return f"{code} {text}".strip()


def _judge(code: int, reply: str, rcpt: str) -> None:
    if 400 <= code < 500 or code < 200:
        raise TransientError(f"downstream deferred {rcpt!r}: {reply}")
    raise Rejected(f"downstream rejected {rcpt!r}: {reply}")


class Downstream:
    def __init__(self, settings: DeliverySettings) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"delivery mode {settings.mode!r} is not one of {MODES}")
        self.settings = settings
        self.conn: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        cls = smtplib.LMTP if s.mode == "lmtp" else smtplib.SMTP
        conn = cls(local_hostname=s.local_hostname, timeout=s.timeout_s)
        conn.connect(s.host, s.port)
        conn.ehlo_or_helo_if_needed()
        return conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self.conn.quit()
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None

    def send(self, mail_from: str, rcpt: str, data: bytes) -> None:
        """Hand ``data`` to the server for one recipient, or raise TransientError / Rejected."""
        # smtplib re-parses addresses (quoteaddr): "<x@evil.test>@example.com" would go out as
        # RCPT TO:<x@evil.test>, mail for one address delivered, or relayed, to another. Such a
        # recipient (only a forged event can carry one; SMTP ingress keeps quotes) is refused.
        if "\r" in rcpt + mail_from or "\n" in rcpt + mail_from or smtplib.quoteaddr(rcpt) != f"<{rcpt}>":
            raise Rejected(f"not one address: {rcpt!r} would be sent as {smtplib.quoteaddr(rcpt)!r}")
        wire = _BARE_LF.sub(b"\r\n", data)  # the protocol's line ending; the content is unchanged
        options = [] if (mail_from + rcpt).isascii() else ["SMTPUTF8"]
        try:
            if self.conn is None:
                self.conn = self._connect()
            self.conn.sendmail(mail_from, [rcpt], wire, mail_options=options)
        except smtplib.SMTPRecipientsRefused as e:
            code, msg = next(iter(e.recipients.values()))
            self._judge_keep(code, _reply(code, msg), rcpt)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
            self._judge_keep(e.smtp_code, _reply(e.smtp_code, e.smtp_error), rcpt)
        except smtplib.SMTPNotSupportedError as e:  # an internationalised address the server cannot take
            raise Rejected(f"downstream cannot take {rcpt!r}: {e}") from None
        except (smtplib.SMTPException, OSError) as e:  # down, timed out, disconnected, bad greeting
            self.close()
            raise TransientError(f"downstream {self.settings.host}:{self.settings.port} unavailable: {e!r}") from None

    def _judge_keep(self, code: int, reply: str, rcpt: str) -> None:
        if code == 421:  # the server is closing the session
            self.close()
        _judge(code, reply, rcpt)
