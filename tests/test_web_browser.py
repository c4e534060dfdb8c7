"""The web worker in a real browser: headless Chromium and its driver from Debian's packages
(`make tools` installs them as root), driven by Selenium, against ``floodgate web`` and
``floodgate deliver`` running as worker processes on the real broker.

One browser session serves every test of the module (Chromium takes seconds to start). Every
request the browser makes to anything but the web worker goes to a local canary proxy
(``--proxy-server``; loopback is never proxied), which counts it and answers 404: a remote load
is counted, never made. Script that runs posts a message to the top page, where a listener
installed before any page script (CDP ``Page.addScriptToEvaluateOnNewDocument``) records it. A
control page, the same hostile HTML unsanitized in a frame that may run script, proves both
detectors see what they should before the real pages are judged.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from pipeline import kafka
from pipeline.core import config, events
from pipeline.kafka import topics
from pipeline.node import Node, free_port
from pipeline.sinks.quarantine import Quarantine
from pipeline.web.security import Signer
from tests import hostile
from tests.kafka_helpers import wait_for
from tests.worker_helpers import delivered_files, event_ids

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="chromium and chromium-driver are not installed (`make tools` as root installs them)"),
]
REPORTS = config.ROOT / "reports"
SECRET = "browser-test-secret-" + "z" * 32
TOKEN = "browser-test-admin-token"
# Headless Chromium on a closed network: no sandbox (root in a container), no GPU, and none of the
# background connections (QUIC, component updates, sync) that fail here many at a time.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--window-size=1400,1000",
                  # Sandboxed frames in the page's own renderer, so that ChromeDriver's performance log
                  # sees their requests too (out of process, their network events are not in it).
                  "--disable-site-isolation-trials",
                  # ...and none of the browser's own services that call home from a login form (autofill,
                  # the password leak check): the canary must count pages' requests only.
                  "--disable-features=IsolateSandboxedIframes,AutofillServerCommunication,PasswordLeakDetection,"
                  "OptimizationHints,MediaRouter,Translate")
PAGE_TIMEOUT_S = 60  # a page of the 8 MiB attachment bomb renders in about a second
LISTENER = """
if (window === window.top) {
  window.__xss = [];
  window.addEventListener('message', function (e) { window.__xss.push(String(e.data)); });
}
"""


@dataclass
class Canary:
    """A local HTTP proxy that answers every request 404 and counts it (remote requests), and
    serves control pages directly (``/control/<case>``)."""

    server: ThreadingHTTPServer
    hits: list[str] = field(default_factory=list)
    controls: dict[str, bytes] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def payload_hits(self) -> list[str]:
        """Requests for the hostile corpus's host: what a page or its frames loaded because a
        message said so. The rest are the browser's own services calling home (component
        updates, its search engine, account checks: Chromium does that from a blank page, flags
        or not); the performance log proves those were not the pages'."""
        return [h for h in self.hits if urlsplit(h.split()[1] if "://" in h else "//" + h.split()[1]).hostname
                == hostile.CANARY_HOST]


def start_canary() -> Canary:
    canary = Canary(server=None)  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def _count(self) -> None:
            canary.hits.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith("/control/") and self.path[9:] in canary.controls:
                body = canary.controls[self.path[9:]]
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self._count()

        do_POST = do_HEAD = do_CONNECT = do_PUT = do_OPTIONS = _count

        def log_message(self, *args: object) -> None:
            pass

    canary.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=canary.server.serve_forever, name="canary", daemon=True).start()
    return canary


@dataclass
class Site:
    settings: config.Settings
    node: Node
    url: str  # the web worker, http://127.0.0.1:PORT
    canary: Canary
    driver: Any
    mail: dict[str, events.MailEvent]  # by name: the scenario's messages and every hostile case


def spam(raw: bytes, rcpt: tuple[str, ...], sender: str = "offers@spam.test") -> events.MailEvent:
    event = events.new_event(events.Envelope(sender, rcpt, "203.0.113.9", "bot.spam.test"), raw)
    return replace(event.classified("spam", 0.97, "browser-test"), lane="priority")


def scenario() -> dict[str, events.MailEvent]:
    def mail(subject: str, to: str, text: str) -> bytes:
        return (f"From: Shop <offers@shop.test>\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n").encode()

    found = {
        "invoice": spam(mail("Invoice 4711 for March", "bob@example.com", "Your invoice is attached."),
                        ("bob@example.com",), "billing@supplier.test"),
        "carol": spam(mail("Carol's parcel notice", "carol@example.com", "A parcel is waiting."),
                      ("carol@example.com",)),
        "both": spam(mail("Team offsite", "bob@example.com, carol@example.com", "See you there."),
                     ("bob@example.com", "carol@example.com")),
    }
    for i in range(12):
        found[f"filler{i}"] = spam(mail(f"Cheap watches, offer {i}", "bob@example.com", "Buy now."),
                                   ("bob@example.com",))
    for case in hostile.all_cases():
        found[case.name] = replace(case.event().classified("spam", 0.99, "browser-test"), lane="priority")
    return found


def chrome(canary: Canary, profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 # Every request to anything but loopback goes to the canary (loopback is never proxied).
                 f"--proxy-server=http://127.0.0.1:{canary.port}"):
        options.add_argument(flag)
    # No password manager (it checks a signed-in operator's password against Google's leak service)
    # and no browser sign-in (it asks accounts.google.com which accounts there are).
    options.add_experimental_option("prefs", {"credentials_enable_service": False,
                                              "profile.password_manager_enabled": False,
                                              "profile.password_manager_leak_detection": False,
                                              "signin.allowed": False, "signin.allowed_on_next_startup": False})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": LISTENER})
    return driver


@pytest.fixture(scope="module")
def site(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("web-browser")
    settings = config.private(config.load(env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap}), "wb", work)
    settings = replace(settings, web=replace(settings.web, secret_key=SECRET, port=free_port()))
    settings = replace(settings, web=replace(settings.web, public_url=f"http://127.0.0.1:{settings.web.port}"))
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    mail = scenario()
    store = Quarantine(settings.paths.quarantine_db)
    for i, event in enumerate(mail.values()):  # one second apart, in order: the list's order is known
        store.add([event], now=time.time() - 3600 + i)
    store.close()
    node = Node(settings, work / "logs")
    canary = start_canary()
    driver = None
    try:
        node.start("web", ["web"], extra_env={"FLOODGATE_ADMIN_TOKEN": TOKEN})
        node.start("deliver", ["deliver"])
        node.wait_ready()
        driver = chrome(canary, work / "chromium-profile")
        yield Site(settings, node, settings.web.public_url, canary, driver, mail)
    finally:
        if driver is not None:
            driver.quit()
        node.stop_all()
        canary.server.shutdown()
        topics.delete(settings, admin)


def requests_made(driver: Any) -> list[str]:
    """URLs of every request the browser started since the last call (the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = orjson.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def xss_seen(driver: Any) -> list[str]:
    return driver.execute_script("return window.__xss || []")


def click(driver: Any, element: Any) -> None:
    """Click something that loads a new page, and wait until it has (the old page's root is gone)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, PAGE_TIMEOUT_S).until(expected_conditions.staleness_of(old))


def sign_in(site: Site) -> None:
    from selenium.webdriver.common.by import By

    d = site.driver
    d.get(f"{site.url}/login")
    d.find_element(By.NAME, "operator").send_keys("ann")
    d.find_element(By.NAME, "token").send_keys(TOKEN)
    click(d, d.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
    assert d.current_url.endswith("/quarantine"), d.find_element(By.TAG_NAME, "main").text


def test_an_operator_finds_a_message_releases_it_and_it_is_delivered_once(site: Site) -> None:
    from selenium.webdriver.common.by import By

    d, invoice = site.driver, site.mail["invoice"]
    sign_in(site)
    # The lanes' first lag sample takes a few seconds; the README's screenshot shows it.
    wait_for(lambda: d.refresh() or d.find_elements(By.CSS_SELECTOR, "table.lanes"), 60, 1.0, "the lanes' status")
    REPORTS.mkdir(exist_ok=True)
    d.save_screenshot(str(REPORTS / "web-list.png"))
    d.find_element(By.NAME, "subject").send_keys("invoice 4711")
    click(d, d.find_element(By.CSS_SELECTOR, "form.search button[type=submit]"))
    rows = d.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")
    assert len(rows) == 1 and "Invoice 4711" in rows[0].text
    click(d, rows[0].find_element(By.CSS_SELECTOR, "td.subject a"))
    assert d.find_element(By.TAG_NAME, "h1").text == "Invoice 4711 for March"
    assert "Your invoice is attached." in d.find_element(By.CSS_SELECTOR, "pre.body").text
    click(d, d.find_element(By.CSS_SELECTOR, "button[value=release]"))
    assert "1 of 1 done" in d.find_element(By.TAG_NAME, "h1").text
    root = site.settings.paths.maildir_root
    wait_for(lambda: invoice.id in event_ids(delivered_files(root)), 60, what="the released message delivered")
    # Released again (the page still open elsewhere): refused, and nothing more is delivered.
    d.get(f"{site.url}/quarantine/m/{invoice.id}")
    assert "released by ann" in d.find_element(By.CSS_SELECTOR, "table.summary").text
    assert not d.find_elements(By.CSS_SELECTOR, "button[value=release]")
    time.sleep(2)  # whatever else would arrive, would by now
    copies = [p for p in delivered_files(root) if invoice.id in p.name]
    assert len(copies) == 1 and copies[0].parent.parent.name.startswith("bob.")


def test_a_recipients_link_shows_only_their_mail_and_a_tampered_or_old_one_is_refused(site: Site,
                                                                                       monkeypatch) -> None:
    from itsdangerous import TimestampSigner
    from selenium.webdriver.common.by import By

    d, signer = site.driver, Signer(site.settings.web, SECRET)
    bob = signer.link(["bob@example.com"])
    d.get(f"{site.url}/u/{bob}?limit=200")
    page = d.find_element(By.TAG_NAME, "main").get_attribute("innerHTML")
    assert site.mail["both"].id in page and site.mail["filler0"].id in page
    assert site.mail["carol"].id not in page and site.mail["active_html"].id not in page  # victim@'s
    d.get(f"{site.url}/u/{bob}/m/{site.mail['carol'].id}")
    assert "no such message held for you" in d.find_element(By.TAG_NAME, "main").text
    flipped = bob[:-5] + ("A" if bob[-5] != "A" else "B") + bob[-4:]
    d.get(f"{site.url}/u/{flipped}")
    assert "not valid" in d.find_element(By.TAG_NAME, "main").text
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda _self: int(time.time()) - 8 * 86_400)
    old = signer.link(["bob@example.com"])
    monkeypatch.undo()
    d.get(f"{site.url}/u/{old}")
    main = d.find_element(By.TAG_NAME, "main").text
    assert "expired" in main and site.mail["filler0"].id not in d.page_source


def test_no_hostile_message_runs_script_or_loads_anything_remote(site: Site) -> None:
    from selenium.webdriver.common.by import By

    d, canary = site.driver, site.canary
    # The control: the hostile HTML as it arrived, in a frame that may run script, with no policy.
    # Both detectors must fire here, or the real run below would prove nothing.
    raw = site.mail["active_html"].raw
    html = raw[raw.index(b"<html>"):raw.index(b"</html>") + 7]
    canary.controls["frame"] = html
    canary.controls["page"] = (b'<!doctype html><title>control</title><iframe sandbox="allow-scripts" '
                               b'src="/control/frame"></iframe>')
    requests_made(d)
    d.get(f"http://127.0.0.1:{canary.port}/control/page")
    wait_for(lambda: xss_seen(d) and canary.payload_hits(), 30, what="the control's script and remote loads")
    control_hits, control_xss = len(canary.payload_hits()), len(xss_seen(d))
    remote = [u for u in requests_made(d) if not u.startswith(f"http://127.0.0.1:{canary.port}/")]
    assert control_hits and control_xss and remote, "the detectors saw nothing on the control page"
    time.sleep(1)
    canary.hits.clear()

    sign_in(site)
    requests_made(d)
    names = [c.name for c in hostile.all_cases()]
    opened, frames = 0, 0
    for name in names:
        event = site.mail[name]
        d.get(f"{site.url}/quarantine/m/{event.id}")
        assert d.title == "Message · Floodgate", name
        assert xss_seen(d) == [], name
        frame = d.find_elements(By.CSS_SELECTOR, "iframe.html")
        if frame:
            frames += 1
            assert frame[0].get_attribute("sandbox") == ""
            d.switch_to.frame(frame[0])
            wait_for(lambda: d.execute_script("return document.readyState") == "complete", 30, what=name)
            d.switch_to.default_content()
        opened += 1
    d.get(f"{site.url}/quarantine?limit=500&state=all")  # every subject and sender in one list
    time.sleep(2)  # anything a page started, it has started by now
    assert xss_seen(d) == []
    urls = requests_made(d)
    foreign = [u for u in urls if not u.startswith(site.url + "/") and not u.startswith(("data:", "about:"))]
    script_runs = len(xss_seen(d))
    (REPORTS / "web-browser.json").write_bytes(orjson.dumps({
        "messages_opened": opened, "html_frames": frames, "requests": len(urls),
        "remote_requests": len(canary.payload_hits()) + len(foreign), "script_executions": script_runs,
        "browser_service_requests": sorted({h.split()[1] for h in canary.hits if h not in canary.payload_hits()}),
        "control": {"remote_requests": control_hits, "script_executions": control_xss},
        "chromium": d.capabilities.get("browserVersion"),
    }, option=orjson.OPT_INDENT_2))
    assert opened == len(names) and frames >= 3
    assert canary.payload_hits() == [] and foreign == [], (canary.payload_hits(), foreign)
    # The screenshot of a message view for the README: the active-content message.
    d.get(f"{site.url}/quarantine/m/{site.mail['active_html'].id}")
    d.save_screenshot(str(REPORTS / "web-message.png"))
    assert xss_seen(d) == [] and canary.payload_hits() == []


def test_the_web_worker_stops_cleanly(site: Site) -> None:
    # Last in the module: the worker exits 0 on SIGTERM (requests in hand finish first).
    assert site.node.stop("web") == 0
    assert os.path.exists(site.settings.paths.quarantine_db)
