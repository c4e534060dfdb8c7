"""The web worker over HTTP (Starlette's test client; tests/test_web_browser.py drives a real
browser): who may see what, CSRF on every action, the headers every page carries, hostile mail
shown as text or sanitized, and actions going through pipeline.feedback."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pipeline import deliver, feedback
from pipeline.core import config, events
from pipeline.sinks.quarantine import Quarantine
from pipeline.web import message as messages
from pipeline.web.app import create_app
from pipeline.web.security import FRAME_CSP, PAGE_CSP, LoginThrottle, Signer
from pipeline.web.status import Snapshot
from tests import hostile
from tests.kafka_helpers import wait_for
from tests.worker_helpers import classified, delivered_files, end_offsets, event_ids, running

ORIGIN = "http://127.0.0.1:8025"  # the default web.public_url
SECRET = "test-secret-" + "x" * 32
TOKEN = "s3cret-admin-token"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
XSS_SUBJECT = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class NoLanes:
    """The lanes' status without a broker (the browser test has the real one)."""

    def snapshot(self) -> Snapshot:
        return Snapshot(None)

    def close(self) -> None:
        pass


def spam(n: int, rcpt: tuple[str, ...] = ("bob@example.com",), subject: str = "hello") -> events.MailEvent:
    return classified("spam", n, rcpt=rcpt, subject=subject)


def client(settings: config.Settings, admin_token: str = TOKEN) -> TestClient:
    return TestClient(create_app(settings, SECRET, admin_token, lanes=NoLanes()), base_url=ORIGIN)


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found, page[:500]
    return found.group(1)


def login(c: TestClient, name: str = "ann", token: str = TOKEN) -> str:
    """Sign in; the CSRF token of the session's pages."""
    form = c.get("/login")
    done = c.post("/login", data={"operator": name, "token": token, "csrf": csrf_of(form.text)},
                  follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/quarantine", done.text
    return csrf_of(c.get("/quarantine").text)


@pytest.fixture
def local(tmp_path: Path) -> config.Settings:
    return config.private(config.load(env={}), "w", tmp_path)


@pytest.fixture
def held(local: config.Settings) -> Iterator[list[events.MailEvent]]:
    mail = [spam(0), spam(1, ("carol@example.com",)), spam(2, ("bob@example.com", "carol@example.com")),
            spam(3, subject=XSS_SUBJECT)]
    store = Quarantine(local.paths.quarantine_db)
    store.add(mail)
    store.close()
    yield mail


def test_every_page_carries_the_security_headers_and_no_script(local: config.Settings, held) -> None:
    c = client(local)
    login(c)
    link = Signer(local.web, SECRET).link(["bob@example.com"])
    for path in ("/login", "/quarantine", f"/quarantine/m/{held[0].id}", f"/u/{link}", f"/u/{link}/m/{held[0].id}",
                 "/u/forged", "/static/style.css"):
        r = c.get(path)
        assert r.headers["content-security-policy"] == PAGE_CSP, path
        assert "script-src" not in PAGE_CSP and "default-src 'none'" in PAGE_CSP  # no script from anywhere
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin" and r.headers["cache-control"] == "no-store"
        assert "<script" not in r.text.lower(), path
    frame = c.get(f"/quarantine/m/{held[0].id}/body")
    assert frame.status_code == 404  # no HTML part; the frame's own policy still applies
    assert frame.headers["content-security-policy"] == FRAME_CSP and FRAME_CSP.endswith("sandbox")


def test_operators_sign_in_with_the_admin_token_and_csrf(local: config.Settings, held) -> None:
    c = client(local)
    assert c.get("/quarantine", follow_redirects=False).headers["location"] == "/login"
    page = c.get("/login")
    assert "httponly" in page.headers["set-cookie"].lower() and "samesite=strict" in page.headers["set-cookie"].lower()
    csrf = csrf_of(page.text)
    # No CSRF token, a forged one, another site's Origin: refused before the token is looked at.
    assert c.post("/login", data={"operator": "ann", "token": TOKEN}).status_code == 403
    assert c.post("/login", data={"operator": "ann", "token": TOKEN, "csrf": "0" * 64}).status_code == 403
    assert c.post("/login", data={"operator": "ann", "token": TOKEN, "csrf": csrf},
                  headers={"Origin": "http://evil.test"}).status_code == 403
    assert c.post("/login", data={"operator": "ann", "token": TOKEN, "csrf": csrf},
                  headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    wrong = c.post("/login", data={"operator": "ann", "token": "guess", "csrf": csrf})
    assert wrong.status_code == 403 and "wrong name or token" in wrong.text
    assert c.post("/login", data={"operator": " ", "token": TOKEN, "csrf": csrf}).status_code == 403
    ok = c.post("/login", data={"operator": "ann", "token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert c.get("/quarantine").status_code == 200
    # A session cookie with one byte changed is no session.
    forged = client(local)
    session = c.cookies.get("floodgate_session")
    forged.cookies.set("floodgate_session", session[:-5] + ("A" if session[-5] != "A" else "B") + session[-4:])
    assert forged.get("/quarantine", follow_redirects=False).status_code == 303
    # Sign out needs the session's CSRF token too.
    page_csrf = csrf_of(c.get("/quarantine").text)
    assert c.post("/logout", data={}).status_code == 403
    assert c.post("/logout", data={"csrf": page_csrf}, follow_redirects=False).status_code == 303


def test_without_an_admin_token_nobody_signs_in(local: config.Settings, held) -> None:
    c = client(local, admin_token="")
    page = c.get("/login")
    assert "sign-in is off" in page.text
    r = c.post("/login", data={"operator": "ann", "token": "", "csrf": csrf_of(page.text) if "csrf" in page.text
                               else ""})
    assert r.status_code == 403
    assert c.get("/quarantine", follow_redirects=False).status_code == 303


def test_guessing_the_token_is_braked_per_client(local: config.Settings, held) -> None:
    throttle = LoginThrottle(limit=3, window_s=60)
    for _ in range(3):
        throttle.failed("198.51.100.1", now=100)
    assert throttle.blocked("198.51.100.1", now=101) and not throttle.blocked("198.51.100.2", now=101)
    assert not throttle.blocked("198.51.100.1", now=161)  # a minute later
    c = client(local)
    csrf = csrf_of(c.get("/login").text)
    codes = [c.post("/login", data={"operator": "ann", "token": "guess", "csrf": csrf}).status_code for _ in range(11)]
    assert codes == [403] * 10 + [429]
    assert c.post("/login", data={"operator": "ann", "token": TOKEN, "csrf": csrf}).status_code == 429


def test_the_list_searches_pages_and_escapes_what_senders_wrote(local: config.Settings, held) -> None:
    c = client(local)
    login(c)
    page = c.get("/quarantine").text
    assert all(e.id in page for e in held)
    assert XSS_SUBJECT not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    only = c.get("/quarantine", params={"rcpt": "carol@"}).text
    assert held[1].id in only and held[2].id in only and held[0].id not in only
    first = c.get("/quarantine", params={"limit": "25"}).text
    assert "Older" not in first  # four messages: one page
    store = Quarantine(local.paths.quarantine_db)
    store.add([spam(10 + i) for i in range(30)])
    store.close()
    page1 = c.get("/quarantine", params={"limit": "25"}).text
    older = re.search(r'href="(/quarantine\?[^"]*after=[^"]+)"', page1)
    assert older, page1
    page2 = c.get(older.group(1).replace("&amp;", "&")).text
    ids1, ids2 = set(re.findall(r'value="([0-9a-f]{32})"', page1)), set(re.findall(r'value="([0-9a-f]{32})"', page2))
    assert len(ids1) == 25 and len(ids2) == 9 and not ids1 & ids2
    assert 'href="/quarantine?limit=25"' in page2 or "Newest" in page2
    # Nonsense in the query string is ignored, never an error.
    assert c.get("/quarantine", params={"score_min": "nan", "since": "x", "after": "1~../../x",
                                        "state": "<b>", "limit": "9999"}).status_code == 200


def test_a_message_is_shown_as_text_and_sanitized_html_in_a_sandbox(local: config.Settings) -> None:
    raw = (b"From: Attacker <a@spam.test>\r\nTo: bob@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?= <b>x</b>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nplain <script>alert(1)</script> text\x1b[31m\u202e\r\n"
           b"--b\r\nContent-Type: text/html\r\n\r\n<p onclick=alert(1)>hi<script>alert(2)</script>"
           b"<img src=http://tracker.test/p.gif><a href=javascript:alert(3)>link</a>"
           b"<a href=http://evil.test/>out</a><style>body{background:url(http://tracker.test/s)}</style>"
           b"<form action=http://evil.test><input name=p></form><iframe src=http://evil.test></iframe></p>\r\n"
           b"--b\r\nContent-Type: application/pdf; name=\"\xe2\x80\xaegpj.exe\"\r\nContent-Disposition: attachment\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n")
    event = replace(events.new_event(events.Envelope("a@spam.test", ("bob@example.com",)), raw),
                    verdict="spam", score=0.99, model_version="m")
    store = Quarantine(local.paths.quarantine_db)
    store.add([event])
    store.close()
    c = client(local)
    login(c)
    page = c.get(f"/quarantine/m/{event.id}").text
    assert "plain &lt;script&gt;alert(1)&lt;/script&gt; text" in page and "<script>alert" not in page
    assert "\x1b" not in page and "\u202e" not in page  # terminal escapes and bidi overrides made visible
    assert f'<iframe class="html" sandbox src="/quarantine/m/{event.id}/body"' in page
    assert "gpj.exe" in page and "application/pdf" in page  # listed, with its reversal undone
    frame = c.get(f"/quarantine/m/{event.id}/body")
    assert frame.headers["content-security-policy"] == FRAME_CSP
    assert frame.headers["x-frame-options"] == "SAMEORIGIN"
    body = frame.text.lower()
    assert "hi" in body and "link" in body and "out" in body
    for gone in ("<script", "onclick", "javascript:", "<img", "http://", "<style", "<form", "<input", "<iframe",
                 "href", "src="):
        assert gone not in body, gone


def test_every_hostile_message_renders_quickly_and_safely() -> None:
    slowest = 0.0
    for case in hostile.all_cases():
        start = time.perf_counter()
        view = messages.view(case.raw)
        slowest = max(slowest, time.perf_counter() - start)
        for text in (view.headers, view.text or "", *(a.name for a in view.attachments)):
            assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]", text), case.name
        if view.html is not None:
            assert "<script" not in view.html.lower()
            assert not re.search(r"\b(src|href|style|on\w+)\s*=", view.html, re.I), case.name
        assert len(view.text or "") <= messages.MAX_TEXT_CHARS and len(view.attachments) <= messages.MAX_ATTACHMENTS
    assert slowest < 5.0  # the 8 MiB attachment bomb takes ~0.6 s on the development machine


def test_a_recipients_link_shows_only_their_mail_and_a_tampered_or_old_one_nothing(local: config.Settings,
                                                                                   held) -> None:
    c = client(local)
    signer = Signer(local.web, SECRET)
    bob = signer.link(["Bob@Example.com"])
    page = c.get(f"/u/{bob}").text
    assert held[0].id in page and held[2].id in page and held[3].id in page and held[1].id not in page
    assert c.get(f"/u/{bob}/m/{held[0].id}").status_code == 200
    assert c.get(f"/u/{bob}/m/{held[1].id}").status_code == 404  # carol's: not found, not forbidden
    assert c.get(f"/u/{bob}/m/{held[1].id}/body").status_code == 404
    assert c.get(f"/u/{bob}", params={"rcpt": "carol@example.com"}).text.count(held[1].id) == 0
    # Tampered: another address under bob's signature, a flipped character, a session cookie as a link.
    rest = bob.partition(".")[2]
    other = signer.link(["carol@example.com"]).partition(".")[0]
    # (Not the last character: of base64's last character only some bits count.)
    flipped = bob[:-5] + ("A" if bob[-5] != "A" else "B") + bob[-4:]
    for forged in (f"{other}.{rest}", flipped, "x",
                   Signer(local.web, "another-key").link(["bob@example.com"])):
        r = c.get(f"/u/{forged}")
        assert r.status_code == 403 and held[0].id not in r.text and "not valid" in r.text, forged
    # Old: past web.link_max_age_days.
    assert signer.addresses(bob, now=time.time() + 6 * 86_400) == ("bob@example.com",)
    with pytest.raises(Exception, match="expired"):
        signer.addresses(bob, now=time.time() + 8 * 86_400)
    brief = replace(local, web=replace(local.web, link_max_age_days=1 / 86_400))  # one second
    short = client(brief)
    old = Signer(brief.web, SECRET).link(["bob@example.com"])
    time.sleep(2.1)
    r = short.get(f"/u/{old}")
    assert r.status_code == 403 and "expired" in r.text and held[0].id not in r.text


def test_recipients_actions_need_the_links_csrf_and_only_their_own_messages(local: config.Settings, held,
                                                                              monkeypatch) -> None:
    released: list[tuple[list[str], str, bool]] = []

    def fake_release(_s, ids, by, _token=None, _env=None, _lease=None, by_recipient=False):
        released.append((list(ids), by, by_recipient))
        return [feedback.Outcome(i, None, None) for i in ids]

    monkeypatch.setattr(feedback, "release_many", fake_release)
    c = client(local)
    bob = Signer(local.web, SECRET).link(["bob@example.com"])
    csrf = csrf_of(c.get(f"/u/{bob}").text)
    ids = [held[0].id, held[1].id, held[2].id]
    assert c.post(f"/u/{bob}/act", data={"action": "release", "id": ids}).status_code == 403
    carol = Signer(local.web, SECRET).link(["carol@example.com"])
    assert c.post(f"/u/{bob}/act", data={"action": "release", "id": ids,
                                         "csrf": csrf_of(c.get(f"/u/{carol}").text)}).status_code == 403
    assert c.post(f"/u/{bob}/act", data={"action": "delete", "id": ids, "csrf": csrf}).status_code == 403
    assert released == []
    done = c.post(f"/u/{bob}/act", data={"action": "release", "id": ids, "csrf": csrf})
    assert done.status_code == 200
    # Only bob's own message went; carol's is not his, the one to both is an operator's to release.
    assert released == [([held[0].id], "bob@example.com", True)]
    assert "no such message held for you" in done.text and "sent to others too" in done.text
    assert c.get(f"/u/{bob}/act").status_code == 405  # GET never acts (mail scanners follow links)


def test_operator_actions_need_the_sessions_csrf(local: config.Settings, held, monkeypatch) -> None:
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(feedback, "release_many", lambda _s, ids, by, *a, **k: calls.append(("release", ids))
                        or [feedback.Outcome(i, None, None) for i in ids])
    monkeypatch.setattr(feedback, "delete", lambda _s, i, by, *a, **k: calls.append(("delete", i)))
    monkeypatch.setattr(feedback, "report", lambda _s, i, label, by: calls.append((label, i)))
    c = client(local)
    csrf = login(c)
    other = client(local)
    other_csrf = login(other, "bo")
    ids = [held[0].id, held[1].id]
    assert c.post("/quarantine/act", data={"action": "release", "id": ids}).status_code == 403
    assert c.post("/quarantine/act", data={"action": "release", "id": ids, "csrf": other_csrf}).status_code == 403
    assert c.post("/quarantine/act", data={"action": "release", "id": ids, "csrf": csrf},
                  headers={"Origin": "http://evil.test"}).status_code == 403
    assert c.post("/quarantine/act", data={"action": "release", "id": ["../x"], "csrf": csrf}).status_code == 403
    assert c.post("/quarantine/act", data={"action": "purge-all", "id": ids, "csrf": csrf}).status_code == 403
    assert calls == []
    for action in ("release", "report-ham", "delete"):
        assert c.post("/quarantine/act", data={"action": action, "id": ids, "csrf": csrf}).status_code == 200
    assert calls == [("release", ids), ("ham", ids[0]), ("ham", ids[1]), ("delete", ids[0]), ("delete", ids[1])]
    assert c.get("/quarantine/act").status_code == 405


@pytest.mark.kafka
def test_a_bulk_release_from_the_web_is_the_command_lines_release(topic_settings: config.Settings) -> None:
    s = topic_settings
    mail = [spam(i) for i in range(3)]
    store = Quarantine(s.paths.quarantine_db)
    store.add(mail)
    store.close()
    c = client(s)
    csrf = login(c, "ann")
    ids = [e.id for e in mail[:2]]
    done = c.post("/quarantine/act", data={"action": "release", "id": ids, "csrf": csrf})
    assert "2 of 2 done" in done.text
    again = c.post("/quarantine/act", data={"action": "release", "id": ids, "csrf": csrf})
    assert "0 of 2 done" in again.text and again.text.count("already released by ann") == 2
    assert end_offsets(s, "ham") == 2 and end_offsets(s, "feedback") == 2  # one release, one feedback record
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == 2, what="released mail delivered")
    assert sorted(event_ids(delivered_files(s.paths.maildir_root))) == sorted(ids)
    store = Quarantine(s.paths.quarantine_db)
    assert {store.entry(i).released_by for i in ids} == {"ann"} and store.entry(mail[2].id).released_at is None
    store.close()


def test_the_lanes_status_samples_while_someone_looks_and_says_why_not(local: config.Settings) -> None:
    from pipeline.lag import PartitionLag
    from pipeline.lag.status import Status
    from pipeline.web.status import LaneStatus

    class Monitor:
        closed = False

        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def sample(self) -> list[PartitionLag]:
            if self.fail:
                raise RuntimeError("broker down")
            g = local.group
            return [PartitionLag(g("deliver"), "ham", 0, 5, 9, 4, 2.5, True, Status.WARN, 0.0),
                    PartitionLag(g("deliver"), "ham", 1, 5, 6, 1, None, True, Status.OK, 0.0)]

        def status(self, samples: list[PartitionLag]) -> dict[str, Status]:
            return {local.group("deliver"): Status.WARN}

        def close(self) -> None:
            Monitor.closed = True

    lanes = LaneStatus(local, lambda _s: Monitor(False), interval_s=0.05, idle_s=0.5)
    assert lanes.snapshot().at is None  # the first look starts the sampling; the page never waits
    wait_for(lambda: lanes.snapshot().rows, 10, what="a sample")
    rows = {r.worker: r for r in lanes.snapshot().rows}
    assert (rows["deliver"].status, rows["deliver"].lag, rows["deliver"].lag_seconds) == ("WARN", 5, 2.5)
    assert rows["deliver"].lane == "priority lane" and rows["cleanup"].lag == 0
    wait_for(lambda: Monitor.closed, 10, what="sampling to stop once nobody looks")
    failing = LaneStatus(local, lambda _s: Monitor(True), interval_s=0.05, idle_s=0.5)
    failing.snapshot()
    wait_for(lambda: failing.snapshot().error, 10, what="the error shown")
    assert "broker down" in failing.snapshot().error
    failing.close()
