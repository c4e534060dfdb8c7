"""Who may see and do what in ``floodgate web``: operators' sessions, recipients' links, CSRF
tokens, the headers every response carries, and a brake on guessing the admin token.

Everything is signed with ``web.secret_key`` (itsdangerous: HMAC over a key derived per purpose,
the *salt*, so a session can never pass for a link or the other way round):

* **Operator session**: after a login with the admin token (``FLOODGATE_ADMIN_TOKEN``, compared
  in constant time by :func:`pipeline.feedback.authorize`), a cookie holding the operator's name
  and a random session id, signed and timed (``web.session_max_age_s``); HttpOnly,
  SameSite=Strict, Secure when ``web.public_url`` is https. No token configured: no operator can
  log in (the operator view is off, never open).
* **Recipient link**: ``/u/<token>``, the token a signed, timed list of addresses
  (``web.link_max_age_days``); a tampered token fails its signature, an old one its age.
* **CSRF**: every POST carries a token, an HMAC of the session id (operators), of the link
  (recipients) or of a pre-login cookie (the login form), checked in constant time; and a POST
  whose ``Origin`` (or ``Sec-Fetch-Site``) says it came from another site is refused before that.
  GET never changes anything: a mail scanner that follows every link in a digest releases nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from pipeline.core.config import WebSettings

SESSION_COOKIE = "floodgate_session"
LOGIN_COOKIE = "floodgate_login"  # the pre-login CSRF nonce
SESSION_SALT = "floodgate.web.session"
LINK_SALT = "floodgate.web.recipient-link"
CSRF_SALT = b"floodgate.web.csrf"
LINK_ADDRESSES_MAX = 20  # addresses one link may name (a person's aliases, not a domain's users)
# Failed logins: at most this many a minute from one client address, then 429 for the rest of
# the minute. The token is long and random; this only keeps guessing from running at line rate.
LOGIN_FAILURES_PER_MINUTE = 10
LOGIN_WINDOW_S = 60.0
DAY_S = 86_400.0

# Every page: nothing from anywhere but this origin, no script at all (the pages have none), no
# framing by others, forms post only here. The message frame (HTML of a message) has its own.
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
# A message's sanitized HTML: inline style only, nothing fetched, and sandboxed even when opened
# outside its iframe (no script, no form, no popup, no same-origin access: the CSP sandbox
# directive with no allowances).
FRAME_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'; sandbox"
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # A recipient's link is in the URL: never sent to another site. (Not no-referrer: with it browsers
    # send "Origin: null" on our own forms, and the Origin check below could no longer tell them apart.)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # quarantined mail is private
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


class Denied(Exception):
    """A request that may not do what it asks; the message is safe to show."""


@dataclass(frozen=True)
class Operator:
    name: str
    session_id: str


class Signer:
    def __init__(self, web: WebSettings, secret_key: str) -> None:
        self.web = web
        self._key = secret_key.encode()
        self._sessions = URLSafeTimedSerializer(secret_key, salt=SESSION_SALT)
        self._links = URLSafeTimedSerializer(secret_key, salt=LINK_SALT)

    # -- operators -------------------------------------------------------------------------
    def session(self, operator: str) -> str:
        return self._sessions.dumps({"op": operator, "sid": secrets.token_urlsafe(16)})

    def operator(self, cookie: str | None) -> Operator | None:
        if not cookie:
            return None
        try:
            data = self._sessions.loads(cookie, max_age=self.web.session_max_age_s)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("op"), str) or not isinstance(data.get("sid"), str):
            return None
        return Operator(data["op"], data["sid"])

    # -- recipients ------------------------------------------------------------------------
    def link(self, addresses: list[str]) -> str:
        if not addresses or len(addresses) > LINK_ADDRESSES_MAX:
            raise ValueError(f"a link names 1 to {LINK_ADDRESSES_MAX} addresses")
        return self._links.dumps({"a": sorted({a.strip().lower() for a in addresses})})

    def addresses(self, token: str, now: float | None = None) -> tuple[str, ...]:
        """The addresses a link token names; :class:`Denied` if it was tampered with or is too old."""
        max_age = self.web.link_max_age_days * DAY_S
        try:
            if now is None:
                data = self._links.loads(token, max_age=max_age)
            else:  # tests: judge the age as of ``now``
                data, signed_at = self._links.loads(token, return_timestamp=True)
                if now - signed_at.timestamp() > max_age:
                    raise SignatureExpired("expired")
        except SignatureExpired:
            raise Denied("this link has expired; the next digest brings a new one") from None
        except BadSignature:
            raise Denied("this link is not valid") from None
        found = data.get("a") if isinstance(data, dict) else None
        if not isinstance(found, list) or not found or not all(isinstance(a, str) for a in found):
            raise Denied("this link is not valid")
        return tuple(found)

    # -- CSRF ------------------------------------------------------------------------------
    def csrf(self, bound_to: str) -> str:
        """The CSRF token of a session id, a link token or a login nonce."""
        return hmac.new(self._key, CSRF_SALT + b"\0" + bound_to.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, bound_to: str, presented: str | None) -> None:
        if not presented or not hmac.compare_digest(self.csrf(bound_to), presented):
            raise Denied("the form has expired or did not come from this site; reload the page and try again")

    def allowed_origins(self, own: str) -> set[str]:
        """Where a POST may come from: this server as the request names it, and the public URL."""
        public = urlsplit(self.web.public_url)
        return {own.rstrip("/"), f"{public.scheme}://{public.netloc}"}


def check_origin(headers: dict[str, str], allowed: set[str]) -> None:
    """Refuse a POST a browser says came from another site (before the CSRF token is even read)."""
    origin = headers.get("origin")
    if origin is not None and origin != "null" and origin.rstrip("/") not in allowed:
        raise Denied("cross-site request refused")
    if origin == "null":  # a sandboxed frame or a privacy-stripped origin: never one of our pages
        raise Denied("cross-site request refused")
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Denied("cross-site request refused")


class LoginThrottle:
    """Failed logins per client address over a sliding minute (see LOGIN_FAILURES_PER_MINUTE)."""

    def __init__(self, limit: int = LOGIN_FAILURES_PER_MINUTE, window_s: float = LOGIN_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, client: str, now: float | None = None) -> bool:
        with self._lock:
            return len(self._recent(client, time.monotonic() if now is None else now)) >= self.limit

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # bounded: forget clients whose minute is over
                for key in [k for k, v in self._failures.items() if not v or now - v[-1] > self.window_s]:
                    del self._failures[key]
