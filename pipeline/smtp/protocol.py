"""One SMTP conversation (RFC 5321) as an asyncio protocol: commands in, replies out.

A lean state machine rather than a general-purpose server: every connection of a flood passes
through it, so each step is a few bytes operations. The message is read whole with one search
for the end of data (CRLF.CRLF, and nothing else: no SMTP smuggling) and unstuffed with one
replace, not line by line; a session costs no set-up beyond its object. What a message becomes
(limits, admission, the broker) is the host's business (:class:`Host`); this module is only the
protocol.

Replies carry enhanced status codes (RFC 3463). Supported: EHLO/HELO, MAIL (SIZE, BODY,
SMTPUTF8), RCPT, DATA, RSET, NOOP, VRFY (252), HELP, QUIT, and XFORWARD from trusted relays
(Postfix's, for the client and sender its own smtpd saw). PIPELINING is advertised: commands
sent together are answered in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pipeline.smtp import addresses

# RFC 5321 caps lines at 1000 octets, but real mail breaks it (HTML on one line; clients that
# end lines with a bare LF, which makes the whole message one "line"). Lines up to this length
# are accepted and stored unchanged; a longer one refuses the message (500) after its end has
# been read. It also bounds what a connection can make the server buffer for one line.
LINE_LENGTH_LIMIT = 1024 * 1024
# A command line (not message data) longer than this is a client error: RFC 5321 allows 512.
COMMAND_LINE_LIMIT = 4096
# While a reply is pending (the broker's ack), a client that pipelines keeps sending; past this
# much unread input the transport stops reading until the reply is out.
PAUSE_READING_AT = 1024 * 1024
END_OF_DATA = b"\r\n.\r\n"
# XFORWARD attributes Floodgate reads (Postfix's XFORWARD_README); values are xtext (RFC 3461).
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
XFORWARD_VALUE_MAX = 255


@dataclass
class Transaction:
    """One MAIL ... DATA transaction."""

    mail_from: str | None = None  # None: no MAIL yet; "" the null reverse-path
    smtputf8: bool = False
    rcpt_to: list[str] = field(default_factory=list)


@dataclass
class Origin:
    """Who the message comes from as admission sees it: the connection's own peer, or what a
    trusted relay forwarded (XFORWARD)."""

    client: str
    helo: str = ""
    relay: str | None = None  # the trusted relay that forwarded it
    relay_queue_id: str | None = None


class Host(Protocol):
    """What a session needs from the server around it (see :mod:`pipeline.smtp.server`)."""

    hostname: str
    max_message_bytes: int
    max_messages_per_connection: int

    def idle_timeout(self) -> float: ...
    def hard_error_limit(self) -> int: ...
    def error_delay(self, session: Session) -> float: ...
    def trusted_relay(self, session: Session) -> bool: ...
    def check_mail(self, session: Session, origin: Origin) -> str | None: ...
    def check_rcpt(self, session: Session, address: str) -> tuple[str | None, str]: ...
    def deliver(self, session: Session, origin: Origin, txn: Transaction, raw: bytes) -> Awaitable[str]: ...
    def opened(self, session: Session) -> str | None: ...
    def refusal_delay(self, session: Session) -> float: ...
    def refusal_closed(self, session: Session) -> None: ...
    def transaction_ended(self, session: Session) -> None: ...
    def closed(self, session: Session) -> None: ...


def xtext_decode(value: str) -> str | None:
    """An XFORWARD value (xtext, RFC 3461: ``+XX`` hex escapes), made printable; None for
    ``[UNAVAILABLE]`` or a malformed value. Postfix sends ``=`` unescaped; it is accepted."""
    if value == "[UNAVAILABLE]":
        return None
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            try:
                code = int(value[i + 1:i + 3], 16)
            except ValueError:
                return None
            if len(value[i + 1:i + 3]) != 2:
                return None
            out.append(chr(code) if 0x20 < code < 0x7F else "?")
            i += 3
        elif "!" <= c <= "~":
            out.append(c)
            i += 1
        else:
            return None
    decoded = "".join(out)
    return decoded if len(decoded) <= XFORWARD_VALUE_MAX else None


class Session(asyncio.Protocol):
    """One client connection. ``peer`` is its address; everything else is the host's."""

    def __init__(self, host: Host, peer: str) -> None:
        self.host = host
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.helo: str | None = None
        self.esmtp = False
        self.txn = Transaction()
        self.forwarded: dict[str, str | None] = {}  # XFORWARD attributes of the next transaction
        self.in_data = False
        self._data_scanned = 0  # bytes of buf already searched for the end of data
        self._data_size = 0  # message bytes seen, the discarded ones of an oversized message too
        self._data_overflow = False
        self.busy = False  # a reply is pending (the broker's ack, or an error delay)
        self.closing = False
        self.messages = 0  # accepted on this connection
        self.errors = 0  # error replies on this connection
        self.opened_at = self.last_active = time.monotonic()
        self._paused = False
        self._pending: asyncio.Future[None] | None = None
        self.refused = False  # turned away at connect: no session was started

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        refused = self.host.opened(self)
        if refused:  # over a limit: refused before a session costs anything
            self.refused = True
            delay = self.host.refusal_delay(self)
            if delay > 0:  # a tarpit: a client that reconnects at once waits first
                asyncio.get_running_loop().call_later(delay, self.close, refused)
            else:
                self.close(refused)
            return
        self.reply(f"220 {self.host.hostname} Floodgate ESMTP")

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.last_active = time.monotonic()
        self.buf += data
        if self.busy:
            if len(self.buf) > PAUSE_READING_AT and not self._paused and self.transport:
                self.transport.pause_reading()
                self._paused = True
            return
        self._work()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.refused:
            self.host.refusal_closed(self)
        else:
            self._end_txn()
            self.host.closed(self)

    # -- output --------------------------------------------------------------------------------
    def reply(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode("utf-8", "replace") + b"\r\n")

    def close(self, line: str | None = None) -> None:
        if line:
            self.reply(line)
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _error(self, line: str) -> None:
        """An error reply: counted; slowed down by the host's error delay (a tarpit for clients
        that keep failing); past the hard error limit the connection is closed."""
        self.errors += 1
        if self.errors > self.host.hard_error_limit():
            self.close("421 4.7.0 too many errors, closing connection")
            return
        delay = self.host.error_delay(self)
        if delay <= 0:
            self.reply(line)
            return
        self.busy = True
        asyncio.get_running_loop().call_later(delay, self._after_delay, line)

    def _after_delay(self, line: str) -> None:
        self.busy = False
        if not self.closing:
            self.reply(line)
            self._work()

    def _respond(self, line: str) -> None:
        if line[0] in "45":
            self._error(line)
        else:
            self.reply(line)

    # -- input ---------------------------------------------------------------------------------
    def _work(self) -> None:
        """Handle what the buffer holds, until a reply is pending or more input is needed."""
        while not self.busy and not self.closing:
            if self.in_data:
                if not self._data():
                    break
                continue
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > COMMAND_LINE_LIMIT:
                    self.buf.clear()
                    self._error("500 5.5.2 line too long")
                break
            line = bytes(self.buf[:end]).rstrip(b"\r")
            del self.buf[:end + 1]
            if len(line) > COMMAND_LINE_LIMIT:
                self._error("500 5.5.2 line too long")
                continue
            self._command(line)
        if self._paused and not self.busy and len(self.buf) < PAUSE_READING_AT and self.transport:
            self.transport.resume_reading()
            self._paused = False

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        handler = self._COMMANDS.get(verb.upper())
        if handler is None:
            self._error("500 5.5.2 command not recognized")
            return
        handler(self, arg.strip(b" "))

    # -- commands ------------------------------------------------------------------------------
    def _greeting(self, arg: bytes, esmtp: bool) -> None:
        name = arg.decode("utf-8", "replace").strip()
        if not name:
            self._error(f"501 5.5.4 syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self._end_txn()
        self.helo, self.esmtp = name, esmtp
        self.forwarded = {}
        if not esmtp:
            self.reply(f"250 {self.host.hostname}")
            return
        lines = [self.host.hostname, "PIPELINING", f"SIZE {self.host.max_message_bytes}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.host.trusted_relay(self):
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        self.reply("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def smtp_EHLO(self, arg: bytes) -> None:
        self._greeting(arg, esmtp=True)

    def smtp_HELO(self, arg: bytes) -> None:
        self._greeting(arg, esmtp=False)

    def smtp_MAIL(self, arg: bytes) -> None:
        if self.helo is None:
            self._error("503 5.5.1 send HELO or EHLO first")
            return
        if self.txn.mail_from is not None:
            self._error("503 5.5.1 nested MAIL command")
            return
        if self.messages >= self.host.max_messages_per_connection and not self.host.trusted_relay(self):
            self.close("421 4.7.0 too many messages on this connection, reconnect")
            return
        try:
            path = addresses.parse(arg, b"FROM:", smtputf8_allowed=False)
        except addresses.PathError as e:
            self._error(e.reply)
            return
        params = dict(path.params)
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and params.pop("SMTPUTF8") is not None:
            self._error("501 5.5.4 SMTPUTF8 takes no value")
            return
        body = params.pop("BODY", None)
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            self._error("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                self._error("501 5.5.4 SIZE takes a number")
                return
            if int(size) > self.host.max_message_bytes:
                self._error("552 5.3.4 message size exceeds fixed maximum message size")
                return
        if params:
            self._error("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        refused = self.host.check_mail(self, self.origin())
        if refused:
            self._respond(refused)
            return
        self.txn = Transaction(mail_from=path.address, smtputf8=smtputf8)
        self.reply("250 2.1.0 OK")

    def smtp_RCPT(self, arg: bytes) -> None:
        if self.txn.mail_from is None:
            self._error("503 5.5.1 need MAIL before RCPT")
            return
        try:
            path = addresses.parse(arg, b"TO:", smtputf8_allowed=self.txn.smtputf8)
        except addresses.PathError as e:
            self._error(e.reply)
            return
        if path.params:
            self._error("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        refused, address = self.host.check_rcpt(self, path.address)
        if refused:
            self._respond(refused)
            return
        self.txn.rcpt_to.append(address)
        self.reply("250 2.1.5 OK")

    def smtp_DATA(self, arg: bytes) -> None:
        if arg:
            self._error("501 5.5.4 syntax: DATA")
            return
        if self.txn.mail_from is None or not self.txn.rcpt_to:
            self._error("503 5.5.1 need RCPT before DATA")
            return
        self.in_data = True
        self._data_scanned = 0
        self._data_size = 0
        self._data_overflow = False
        self.reply("354 End data with <CR><LF>.<CR><LF>")

    def smtp_RSET(self, arg: bytes) -> None:
        self._end_txn()
        self.forwarded = {}
        self.reply("250 2.0.0 OK")

    def smtp_NOOP(self, arg: bytes) -> None:
        self.reply("250 2.0.0 OK")

    def smtp_VRFY(self, arg: bytes) -> None:
        self.reply("252 2.5.2 cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, arg: bytes) -> None:
        self.reply("214 2.0.0 commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

    def smtp_QUIT(self, arg: bytes) -> None:
        self.close("221 2.0.0 Bye")

    def smtp_XFORWARD(self, arg: bytes) -> None:
        if not self.host.trusted_relay(self):
            self._error("550 5.7.0 XFORWARD is only for trusted relays")
            return
        if self.txn.mail_from is not None:
            self._error("503 5.5.1 XFORWARD inside a mail transaction")
            return
        found: dict[str, str | None] = {}
        for item in arg.decode("ascii", "replace").split():
            name, eq, value = item.partition("=")
            name = name.upper()
            if not eq or name not in XFORWARD_ATTRIBUTES:
                self._error("501 5.5.4 syntax: XFORWARD attribute=value ...")
                return
            found[name] = xtext_decode(value)
        if not found:
            self._error("501 5.5.4 syntax: XFORWARD attribute=value ...")
            return
        self.forwarded |= found
        self.reply("250 2.0.0 OK")

    def _not_implemented(self, arg: bytes) -> None:
        self._error("502 5.5.1 command not implemented")

    _COMMANDS: ClassVar[dict[bytes, Callable[[Session, bytes], None]]] = {}

    # -- the message ---------------------------------------------------------------------------
    def _data(self) -> bool:
        """Consume message data; True when the end of data was found (a reply follows)."""
        buf = self.buf
        if self._data_size == 0 and buf[:3] == b".\r\n":  # the end right after DATA: empty
            end, content_end, skip = 0, 0, 3
        else:
            end = buf.find(END_OF_DATA, max(0, self._data_scanned - 4))
            content_end, skip = end + 2, end + 5
        if end < 0:
            # Keep what may be the start of the end marker; an oversized message is discarded
            # as it comes, so a client cannot make us hold more than the limit.
            self._data_scanned = len(buf)
            if self._data_size + len(buf) > self.host.max_message_bytes + 2:
                self._data_overflow = True
                keep = bytes(buf[-4:])
                self._data_size += len(buf) - len(keep)
                buf[:] = keep
                self._data_scanned = len(keep)
            return False
        raw = bytes(buf[:content_end])
        del buf[:skip]
        self.in_data = False
        size = self._data_size + len(raw)
        if self._data_overflow or size > self.host.max_message_bytes:
            self._end_txn()
            self._error("552 5.3.4 message size exceeds fixed maximum message size")
            return True
        if len(raw) > LINE_LENGTH_LIMIT and _longest_line(raw) > LINE_LENGTH_LIMIT:
            self._end_txn()
            self._error("500 Line too long.")
            return True
        # Dot-unstuffing (RFC 5321 4.5.2): one replace for the whole message.
        if raw.startswith(b".."):
            raw = raw[1:]
        raw = raw.replace(b"\r\n..", b"\r\n.")
        txn, origin = self.txn, self.origin()
        self.busy = True
        self._pending = asyncio.ensure_future(self._finish(self.host.deliver(self, origin, txn, raw)))
        return True

    async def _finish(self, pending: Awaitable[str]) -> None:
        try:
            line = await pending
        except Exception as e:  # a bug in the host must cost one message, never the server
            line = f"451 4.3.0 temporary failure ({type(e).__name__}), try again later"
        self._end_txn()
        self.busy = False
        if line.startswith("250"):
            self.messages += 1
        if not self.closing:
            self._respond(line)
            self._work()

    def _end_txn(self) -> None:
        """The transaction ends (delivered, refused, reset or cut off): a fresh one, and no
        forwarded attributes, which last one transaction."""
        if self.txn.mail_from is not None:
            self.host.transaction_ended(self)
        self.txn = Transaction()
        self.forwarded = {}

    def origin(self) -> Origin:
        """The client as admission sees it: XFORWARD's ADDR and HELO from a trusted relay (never
        mixed with our own session's), else the connection's own peer and HELO."""
        addr = self.forwarded.get("ADDR")
        if addr:
            client = addr.removeprefix("IPv6:").removeprefix("ipv6:")
            return Origin(client, self.forwarded.get("HELO") or "", relay=self.peer,
                          relay_queue_id=self.forwarded.get("IDENT"))
        return Origin(self.peer, self.helo or "")


def _longest_line(raw: bytes) -> int:
    """The longest CRLF-delimited line (bare LFs do not end a line in SMTP)."""
    longest, start = 0, 0
    while True:
        end = raw.find(b"\r\n", start)
        if end < 0:
            return max(longest, len(raw) - start)
        longest = max(longest, end - start)
        start = end + 2


Session._COMMANDS = {
    b"EHLO": Session.smtp_EHLO, b"HELO": Session.smtp_HELO, b"MAIL": Session.smtp_MAIL,
    b"RCPT": Session.smtp_RCPT, b"DATA": Session.smtp_DATA, b"RSET": Session.smtp_RSET,
    b"NOOP": Session.smtp_NOOP, b"VRFY": Session.smtp_VRFY, b"HELP": Session.smtp_HELP,
    b"QUIT": Session.smtp_QUIT, b"XFORWARD": Session.smtp_XFORWARD,
    **{verb: Session._not_implemented for verb in (b"EXPN", b"TURN", b"ETRN", b"AUTH", b"STARTTLS", b"BDAT")},
}
