"""A private authoritative DNS server for the tests and benches: Knot DNS (Debian package ``knot``) on loopback.

Standard library only. Zones are Python data, written as zone files in a temporary directory;
``knotd`` runs in the foreground as a child of the test process on a free 127.0.0.1 port (UDP
and TCP), never as a system service and never on port 53::

    zones = {
        "sender.test": [
            ("@", "TXT", "v=spf1 ip4:127.0.0.1 -all"),
            ("sel._domainkey", "TXT", "v=DKIM1; k=rsa; p=MIIB..."),   # split into 255-byte strings
            ("_dmarc", "TXT", "v=DMARC1; p=reject"),
            ("@", "MX", "10 mx.sender.test."),
            ("mx", "A", "127.0.0.1", 60),                              # optional TTL
        ],
    }
    why = KnotServer.unavailable()          # None, or why it cannot run (for pytest.skip)
    with KnotServer(zones) as dns:          # started, every zone served (SOA answered)
        dns.port                            # 127.0.0.1:dns.port
        dns.reload({...})                   # new zone data (zones may be added/removed); waits
        dns.pause() / dns.resume()          # SIGSTOP/SIGCONT: a server that does not answer
    # stopped, temp dir removed

Owners are relative to the zone (``@`` for the apex) or absolute with a trailing dot. A TXT
value is a ``str``/``bytes`` (split into strings of at most 255 bytes, as DNS requires) or a
list of them (each one split likewise); other types take their zone-file presentation text.
Every zone gets an SOA (serial bumped on each reload; minimum TTL = negative-caching TTL,
``negative_ttl``) and an NS record.

:func:`silent_port` gives a UDP port on loopback where nothing ever answers (a resolver that
is down or too slow, without waiting on knotd).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

Record = tuple[str, str, Any] | tuple[str, str, Any, int]
Zones = Mapping[str, Sequence[Record]]

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
DEFAULT_TTL = 300
SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SEARCH_PATH)
    return shutil.which(name, path=path)


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback right now (knotd binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port for UDP and TCP")


def _quote(chunk: bytes) -> str:
    out = []
    for b in chunk:
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def txt_rdata(value: str | bytes | Iterable[str | bytes]) -> str:
    """TXT presentation text: each string split into <= 255-byte character-strings, quoted."""
    parts = [value] if isinstance(value, str | bytes) else list(value)
    chunks: list[str] = []
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        if not data:
            chunks.append('""')
        for i in range(0, len(data), 255):
            chunks.append(_quote(data[i:i + 255]))
    return " ".join(chunks) if chunks else '""'


def _owner(name: str) -> str:
    if any(c.isspace() or c in ';()"' for c in name) or not name:
        raise ValueError(f"bad owner name {name!r}")
    return name


def zone_text(origin: str, records: Sequence[Record], serial: int, negative_ttl: int) -> str:
    origin = origin.rstrip(".").lower() + "."
    lines = [f"$ORIGIN {origin}", f"$TTL {DEFAULT_TTL}",
             f"@ {DEFAULT_TTL} SOA ns.{origin} hostmaster.{origin} {serial} 3600 600 86400 {negative_ttl}",
             f"@ {DEFAULT_TTL} NS ns.{origin}"]
    has_ns_addr = False
    for rec in records:
        owner, rtype, value = rec[0], rec[1].upper(), rec[2]
        ttl = rec[3] if len(rec) > 3 else DEFAULT_TTL  # type: ignore[misc]
        if rtype in ("SOA",):
            raise ValueError("the SOA is made by KnotServer")
        rdata = txt_rdata(value) if rtype in ("TXT", "SPF") else str(value)
        if "\n" in rdata:
            raise ValueError(f"record data may not contain a newline: {rdata!r}")
        lines.append(f"{_owner(owner)} {int(ttl)} {rtype} {rdata}")
        has_ns_addr = has_ns_addr or (owner in ("ns", f"ns.{origin}") and rtype in ("A", "AAAA"))
    if not has_ns_addr:
        lines.append(f"ns {DEFAULT_TTL} A 127.0.0.1")
    return "\n".join(lines) + "\n"


def soa_serial(port: int, zone: str, timeout: float = 0.5, host: str = HOST) -> int | None:
    """The SOA serial that the server at host:port answers for ``zone`` (None: no answer)."""
    qid = random.randrange(65536)
    qname = b"".join(bytes([len(label)]) + label.encode("idna")
                     for label in zone.rstrip(".").split(".") if label) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0) + qname + struct.pack("!HH", 6, 1)  # SOA IN, RD=0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query, (host, port))
            data, _ = s.recvfrom(4096)
        except OSError:  # timeout, or refused (nothing listening yet)
            return None
    rid, flags, _qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid or flags & 0xF or an < 1:  # not ours, an error rcode (REFUSED: zone not loaded), no answer
        return None
    pos = 12 + len(qname) + 4

    def skip_name(p: int) -> int:
        while True:
            n = data[p]
            if n == 0:
                return p + 1
            if n & 0xC0 == 0xC0:
                return p + 2
            p += 1 + n

    pos = skip_name(pos)
    rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[pos:pos + 10])
    if rtype != 6:
        return None
    rdata_end = pos + 10 + rdlen
    p = skip_name(skip_name(pos + 10))  # MNAME, RNAME
    if p + 4 > rdata_end:
        return None
    return int(struct.unpack("!I", data[p:p + 4])[0])


def silent_port() -> tuple[socket.socket, int]:
    """A bound UDP socket on loopback that nobody reads: queries to it are never answered.

    Close the socket when done. (A closed port is different: the kernel answers ICMP
    port-unreachable and a resolver fails at once instead of timing out.)
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    return s, s.getsockname()[1]


class KnotUnavailable(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started knotd dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG; the parent *thread*, so start servers from the main thread)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


_running: set[KnotServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()


class KnotServer:
    """A private knotd serving ``zones`` on 127.0.0.1:port (random free port unless given)."""

    def __init__(self, zones: Zones, *, port: int | None = None, negative_ttl: int = 60,
                 workdir: str | Path | None = None) -> None:
        self.zones: dict[str, list[Record]] = {k.rstrip(".").lower(): list(v) for k, v in zones.items()}
        self.port = port or 0
        self.negative_ttl = negative_ttl
        self._workdir_arg = workdir
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.serial = int(time.time()) % 1_000_000_000
        self.knotd = _which("knotd")
        self.knotc = _which("knotc")

    # -- availability ---------------------------------------------------------------------------------

    @staticmethod
    def unavailable() -> str | None:
        """Why a private knotd cannot run here, or None when it can (use as a pytest skip reason)."""
        knotd, knotc = _which("knotd"), _which("knotc")
        if not knotd or not knotc:
            return ("Knot DNS is not installed (knotd/knotc not found): "
                    "apt-get install --no-install-recommends knot")
        try:
            out = subprocess.run([knotd, "-V"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"knotd cannot run: {e}"
        if out.returncode != 0:
            return f"knotd -V failed: {out.stderr.strip() or out.stdout.strip()}"
        return None

    # -- files ----------------------------------------------------------------------------------------

    def _config(self) -> str:
        assert self.dir is not None
        d = self.dir
        zones = "\n".join(f'  - domain: "{z}."' for z in sorted(self.zones))
        return f"""\
server:
    rundir: "{d}/run"
    listen: {HOST}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: "{d}/knotd.log"
    any: info
database:
    storage: "{d}/db"
control:
    listen: "{d}/run/knot.sock"
template:
  - id: default
    storage: "{d}/zones"
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off
zone:
{zones}
"""

    def _write(self) -> None:
        assert self.dir is not None
        for sub in ("run", "db", "zones"):
            (self.dir / sub).mkdir(exist_ok=True)
        for zone, records in self.zones.items():
            text = zone_text(zone, records, self.serial, self.negative_ttl)
            tmp = self.dir / "zones" / f".{zone}.zone.tmp"
            tmp.write_text(text)
            tmp.replace(self.dir / "zones" / f"{zone}.zone")
        (self.dir / "knot.conf").write_text(self._config())

    def log(self) -> str:
        """knotd's log so far (for assertion messages)."""
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.dir / "knotd.log").read_text(errors="replace")
        return ""

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self) -> KnotServer:
        why = self.unavailable()
        if why:
            raise KnotUnavailable(why)
        assert self.knotd is not None
        self.dir = Path(tempfile.mkdtemp(prefix="knot-", dir=self._workdir_arg))
        chosen = self.port
        for _attempt in range(3):
            self.port = chosen or _free_port()
            self._write()
            with open(self.dir / "knotd.stderr", "wb") as err:
                self.proc = subprocess.Popen([self.knotd, "-c", str(self.dir / "knot.conf")],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                             preexec_fn=_die_with_parent)
            _running.add(self)
            if self._wait_served(START_TIMEOUT_S):
                return self
            rc = self.proc.poll()
            self._kill()
            if rc is None or chosen:  # running but not serving, or a fixed port: no point retrying
                break
        err = (self.dir / "knotd.stderr").read_text(errors="replace") if self.dir else ""
        tail = (err + self.log())[-2000:]
        self.stop()
        raise KnotUnavailable(f"knotd did not serve the zones within {START_TIMEOUT_S:g}s:\n{tail}")

    def _wait_served(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pending = set(self.zones)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            pending = {z for z in pending if soa_serial(self.port, z, 0.2) != self.serial}
            if not pending:
                return True
            time.sleep(0.02)
        return False

    def _knotc(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.knotc is not None and self.dir is not None
        return subprocess.run([self.knotc, "-c", str(self.dir / "knot.conf"), "-t", "5", *args],
                              capture_output=True, text=True, timeout=15)

    def reload(self, zones: Zones | None = None, timeout: float = START_TIMEOUT_S) -> None:
        """Serve new zone data (all zones; zones may be added or removed) and wait until it is served."""
        if self.proc is None:
            raise RuntimeError("knotd is not running")
        if zones is not None:
            self.zones = {k.rstrip(".").lower(): list(v) for k, v in zones.items()}
        self.serial += 1
        self._write()
        out = self._knotc("reload")  # re-reads the configuration (zone list) and every changed zone file
        if out.returncode != 0:
            raise RuntimeError(f"knotc reload failed: {out.stdout}{out.stderr}")
        if not self._wait_served(timeout):
            raise RuntimeError(f"reloaded zones not served within {timeout:g}s:\n{self.log()[-2000:]}")

    def pause(self) -> None:
        """Stop answering (SIGSTOP): queries time out, as with an overloaded or unreachable server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._wait_state(stopped=True)

    def _wait_state(self, stopped: bool, timeout: float = 5.0) -> None:
        """A signal is delivered asynchronously: wait until every thread of knotd has (not) stopped."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        while time.monotonic() < deadline:
            try:
                states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in task_dir.iterdir()]
            except OSError:
                return  # no /proc (or the process is gone): nothing to wait for
            if all((st in "tT") == stopped for st in states):
                return
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._wait_state(stopped=False)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused knotd cannot handle SIGTERM
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Stop knotd (SIGTERM, then SIGKILL) and remove its directory."""
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


@contextlib.contextmanager
def knot(zones: Zones, **kwargs: Any) -> Iterator[KnotServer]:
    with KnotServer(zones, **kwargs) as server:
        yield server
