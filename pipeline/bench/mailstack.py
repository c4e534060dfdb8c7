"""Private Postfix and Dovecot instances on loopback ports under a temp directory, configured from
``infra/postfix`` and ``infra/dovecot``: what the mail-system tests and ``make demo-mailsystem`` run.

Standard library only. Both need root (Postfix's and Dovecot's masters drop privileges themselves)
and the Debian packages ``postfix`` and ``dovecot-core dovecot-imapd dovecot-lmtpd dovecot-sieve``
(``make tools`` installs them when root); :func:`unavailable` says why they cannot run here::

    reason = mailstack.unavailable("postfix", "dovecot", "swaks")

The documented configuration is the tested one: :class:`Postfix` takes every parameter of
``infra/postfix/main.cf``, the ``floodgate`` service of ``master.cf`` and the domains of
``floodgate-transport``, and changes only what a private instance must (:data:`POSTFIX_PRIVATE`:
its own queue, log and listener; :meth:`Postfix.__init__`: the maps as texthash files, the next
hop's port, the recipients, retry times). :class:`Dovecot` includes ``infra/dovecot/floodgate.conf``
with its paths and LMTP port replaced (:data:`DOVECOT_PATHS`) below a private base
(:data:`DOVECOT_PRIVATE`: directories, log, users, IMAP listener).

Notes from getting this to run: the unprivileged users (postfix, the mail user) must pass
through every directory above their files, so pytest's ``tmp_path`` (under a 0700 directory) is
refused and :func:`private_dir` makes a 0711 one under /tmp; Postfix's failures show only in its
maillog; Dovecot's passwd-file must be root:dovecot 0640 (its auth worker reads it); sieve scripts
are compiled with ``sievec`` beforehand (the imap process cannot write the binaries);
``smtplib.LMTP`` reads only the first per-recipient reply, so one recipient per transaction.
``stop()`` leaves ``root`` for a post-mortem; remove it with ``shutil.rmtree``.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INFRA_POSTFIX = ROOT / "infra" / "postfix"
INFRA_DOVECOT = ROOT / "infra" / "dovecot"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0

POSTFIX_PROGRAMS = ("postfix", "postconf", "postqueue")
DOVECOT_PROGRAMS = ("dovecot", "doveadm", "sievec")
DOVECOT_FILES = ("/usr/lib/dovecot/imap", "/usr/lib/dovecot/lmtp",
                 "/usr/lib/dovecot/modules/lib95_imap_sieve_plugin.so",
                 "/usr/lib/dovecot/modules/sieve/lib90_sieve_imapsieve_plugin.so",
                 "/usr/lib/dovecot/modules/sieve/lib90_sieve_extprograms_plugin.so")
PACKAGES = {"postfix": "postfix", "dovecot": "dovecot-core dovecot-imapd dovecot-lmtpd dovecot-sieve",
            "swaks": "swaks"}


# --------------------------------------------------------------------------------------------------
# helpers


def unavailable(*which: str) -> str | None:
    """Why ``which`` ("postfix", "dovecot", "swaks"; default all three) cannot run here, or None."""
    which = which or ("postfix", "dovecot", "swaks")
    if os.name != "posix" or os.geteuid() != 0:
        return "private Postfix/Dovecot instances need root (their masters drop privileges themselves)"
    missing: list[str] = []
    for name in which:
        progs, files = {"postfix": (POSTFIX_PROGRAMS, ()), "dovecot": (DOVECOT_PROGRAMS, DOVECOT_FILES),
                        "swaks": (("swaks",), ())}[name]
        gone = [p for p in progs if which_program(p) is None] + [f for f in files if not os.path.exists(f)]
        if gone:
            missing.append(f"{', '.join(gone)} (Debian: {PACKAGES[name]})")
    if missing:
        return "not installed: " + "; ".join(missing) + " - `make tools` installs them when root"
    return None


def which_program(prog: str) -> str | None:
    # Postfix's commands live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(prog) or shutil.which(prog, path="/usr/sbin:/usr/bin:/sbin:/bin")


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the usual race: take it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = LOOPBACK, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g}s") from None
            time.sleep(0.05)  # polling interval of a deadline-bounded wait


def run(args: Sequence[str], *, check: bool = True, timeout: float = 60,
        **kw: object) -> subprocess.CompletedProcess[str]:
    # stdin from /dev/null and output captured: `postfix check` and friends behave differently on a tty.
    proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is dead for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling interval of a deadline-bounded wait
    return True


def private_dir(prefix: str) -> Path:
    """A fresh directory under the system temp dir that unprivileged mail users can traverse (0711)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


def reachable_by_others(path: Path, mode: int = stat.S_IXOTH) -> bool:
    """``path`` (symlinks resolved) has ``mode`` for others and every directory above it lets them pass."""
    p = path.resolve()
    try:
        return bool(p.stat().st_mode & mode) and all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


def _usable_root(root: Path | str | None, prefix: str, user: str) -> Path:
    path = Path(root).resolve() if root is not None else private_dir(prefix)
    path.mkdir(parents=True, exist_ok=True)
    if not reachable_by_others(path):
        raise ValueError(f"{path}: user {user} cannot reach it (a directory on the way lacks o+x); "
                         f"use mailstack.private_dir()")
    return path


class _Log:
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout_s: float = 15.0, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the log (from character ``start``), waiting for it to appear."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        while True:
            m = rx.search(self.log(), start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in {self.log_path} after {timeout_s:g}s; "
                                   f"its tail:\n{self.log()[-3000:]}")
            time.sleep(0.05)  # polling interval of a deadline-bounded wait


# --------------------------------------------------------------------------------------------------
# Postfix


def read_main_cf(path: Path) -> dict[str, str]:
    """``name = value`` parameters of a main.cf (comments and blank lines skipped, continuation
    lines joined), in their order."""
    params: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and last:
            params[last] += " " + line.strip()
            continue
        name, eq, value = line.partition("=")
        if not eq:
            raise ValueError(f"{path}: not a parameter: {line!r}")
        last = name.strip()
        params[last] = value.strip()
    return params


def master_cf_services(path: Path) -> str:
    """The service entries of a master.cf fragment (its lines without comments)."""
    return "".join(line + "\n" for line in path.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))


def transport_domains(path: Path) -> dict[str, str]:
    """``domain -> transport:nexthop`` of a transport map source file."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            domain, target = line.split()
            out[domain] = target
    return out


# What a private instance needs beyond infra/postfix/main.cf: its own queue, data directory and
# log file, a listener on a loopback port only, no DNS (clients are not looked up, the next hop
# is an address literal), no TLS. The master.cf base: the daemons of a relay-only instance, no
# chroot (nothing to copy into one), postlogd for maillog_file.
POSTFIX_PRIVATE = {
    "compatibility_level": "3.6",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "inet_interfaces": LOOPBACK,
    "inet_protocols": "ipv4",
    "myhostname": "mx.floodgate.test",
    "myorigin": "$myhostname",
    "mynetworks": "127.0.0.0/8",
    "smtpd_peername_lookup": "no",
    "smtp_dns_support_level": "disabled",
    "smtpd_tls_security_level": "none",
    "smtp_tls_security_level": "none",
    "biff": "no",
    "smtpd_banner": "$myhostname ESMTP",
}
MASTER_CF = """\
# service   type      private unpriv chroot wakeup maxproc command
{listen}    inet      n       -       n       -       -       smtpd
pickup      unix      n       -       n       60      1       pickup
cleanup     unix      n       -       n       -       0       cleanup
qmgr        unix      n       -       n       300     1       qmgr
rewrite     unix      -       -       n       -       -       trivial-rewrite
bounce      unix      -       -       n       -       0       bounce
defer       unix      -       -       n       -       0       bounce
trace       unix      -       -       n       -       0       bounce
verify      unix      -       -       n       -       1       verify
flush       unix      n       -       n       1000?   0       flush
proxymap    unix      -       -       n       -       -       proxymap
proxywrite  unix      -       -       n       -       1       proxymap
smtp        unix      -       -       n       -       -       smtp
relay       unix      -       -       n       -       -       smtp
showq       unix      n       -       n       -       -       showq
error       unix      -       -       n       -       -       error
retry       unix      -       -       n       -       -       error
discard     unix      -       -       n       -       -       discard
anvil       unix      -       -       n       -       1       anvil
scache      unix      -       -       n       -       1       scache
postlog     unix-dgram n      -       n       -       1       postlogd
# infra/postfix/master.cf
{floodgate}"""


class Postfix(_Log):
    """A private Postfix MX on loopback, configured from ``infra/postfix``, relaying to Floodgate.

    ``next_hop`` is ``floodgate smtp``'s address; ``recipients`` the valid addresses
    (relay_recipient_maps; None: every address in a relay domain). ``retry_s`` replaces the
    minute of infra's retry times, so a deferred message is retried within seconds.
    """

    def __init__(self, root: Path | str | None = None, *, next_hop: tuple[str, int], port: int | None = None,
                 recipients: Iterable[str] | None = None, retry_s: int = 1,
                 main: Mapping[str, str] | None = None) -> None:
        # The master opens data_directory/master.lock as user postfix: every parent must let it pass.
        self.root = _usable_root(root, "fg-postfix-", "postfix")
        self.port = port or free_port()
        self.next_hop = next_hop
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "maillog"
        infra = read_main_cf(INFRA_POSTFIX / "main.cf")
        self.transport = {d: re.sub(r"\[[^]]+\]:\d+$", f"[{next_hop[0]}]:{next_hop[1]}", t)
                          for d, t in transport_domains(INFRA_POSTFIX / "floodgate-transport").items()}
        self.recipients = None if recipients is None else sorted(recipients)
        # What differs from infra/postfix/main.cf, and why: the maps are texthash files here (no
        # postmap), the transport's next hop is the test's floodgate smtp, retries come sooner.
        self.changed = {
            "transport_maps": f"texthash:{self.config_dir / 'floodgate-transport'}",
            "relay_recipient_maps": f"texthash:{self.config_dir / 'floodgate-recipients'}"
            if self.recipients is not None else "",
            "queue_run_delay": f"{retry_s}s",
            "minimal_backoff_time": f"{retry_s}s",
            "maximal_backoff_time": f"{2 * retry_s}s",
        }
        self.main: dict[str, str] = {
            **POSTFIX_PRIVATE,
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "syslog_name": f"postfix-{self.port}",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            **infra,
            **self.changed,
            **(main or {}),
        }
        self.domains = tuple(self.main["relay_domains"].split())
        self._pid: int | None = None

    def write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")  # the master refuses otherwise
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(
            listen=f"{LOOPBACK}:{self.port}".ljust(11), floodgate=master_cf_services(INFRA_POSTFIX / "master.cf")))
        (self.config_dir / "floodgate-transport").write_text("".join(f"{d} {t}\n" for d, t in self.transport.items()))
        (self.config_dir / "floodgate-recipients").write_text("".join(f"{r} OK\n" for r in self.recipients or ()))
        self.log_path.touch()

    def start(self) -> Postfix:
        self.write_config()
        # `postfix start` runs `postfix check` first (creating the queue's subdirectories, ~3 s);
        # why either failed is in the maillog only, not on stderr.
        proc = run(["postfix", "-c", str(self.config_dir), "start"], check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"postfix start exited {proc.returncode}: {proc.stderr.strip()}\n{self.log()[-3000:]}")
        wait_for_port(self.port)
        self._pid = self.master_pid()
        return self

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        """``postfix stop``, then wait for the master (and with it its children) to be gone."""
        pid = self.master_pid() or self._pid
        if pid is None or not _pid_alive(pid):
            return
        run(["postfix", "-c", str(self.config_dir), "stop"], check=False)
        if not _wait_gone(pid, STOP_TIMEOUT_S):
            run(["postfix", "-c", str(self.config_dir), "abort"], check=False)
            if not _wait_gone(pid, 5):
                os.kill(pid, signal.SIGKILL)
        self._pid = None

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self) -> None:
        """Attempt delivery of every queued message now (``postqueue -f``)."""
        run(["postqueue", "-c", str(self.config_dir), "-f"])

    def queue(self) -> list[dict]:
        """The queue as ``postqueue -j`` reports it: one dict per message (queue_id, sender,
        recipients with their delay_reason, queue_name active/deferred/...)."""
        out = run(["postqueue", "-c", str(self.config_dir), "-j"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for_queue(self, predicate: Callable[[list[dict]], bool] = lambda q: not q,
                       timeout_s: float = 15.0) -> list[dict]:
        """Poll the queue until ``predicate(queue)`` holds (by default: empty)."""
        deadline = time.monotonic() + timeout_s
        while True:
            q = self.queue()
            if predicate(q):
                return q
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue still {q!r} after {timeout_s:g}s; maillog tail:\n{self.log()[-2000:]}")
            time.sleep(0.1)  # polling interval of a deadline-bounded wait

    def swaks(self, mail_from: str, rcpt: str, data: bytes, *, client: str = LOOPBACK,
              helo: str = "client.test") -> tuple[int, str, str | None]:
        """Send one message (CRLF line endings, ending in CRLF) with swaks from ``client`` (any
        127/8 address), exactly as given: (exit code, its transcript, the queue id Postfix gave
        it or None). swaks would replace %TOKENS% and add a line ending; with --no-data-fixup it
        sends the file as DATA, so the file is the dot-stuffed message and the final dot (swaks
        adds the last CRLF)."""
        if not data.endswith(b"\r\n") or b"\n" in data.replace(b"\r\n", b""):
            raise ValueError("swaks() sends CRLF messages ending in CRLF exactly as given; convert first (crlf())")
        stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
        with tempfile.NamedTemporaryFile(prefix="fg-swaks-", suffix=".eml") as f:
            f.write(stuffed + b".")
            f.flush()
            proc = subprocess.run(
                [which_program("swaks") or "swaks", "--server", LOOPBACK, "--port", str(self.port),
                 "--local-interface", client, "--helo", helo, "--from", mail_from, "--to", rcpt,
                 "--no-data-fixup", "--data", "@" + f.name, "--suppress-data", "--timeout", "30"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=60)
        found = re.search(r"<-\s+250 2\.0\.0 Ok: queued as (\w+)", proc.stdout)
        return proc.returncode, proc.stdout + proc.stderr, found.group(1) if found else None

    def sent(self) -> dict[str, int]:
        """Queue id -> how many times Postfix's log says it was handed on (``status=sent``)."""
        counts: dict[str, int] = {}
        for qid in re.findall(r" (\w+): to=<[^>]*>, relay=.* status=sent ", self.log()):
            counts[qid] = counts.get(qid, 0) + 1
        return counts


# --------------------------------------------------------------------------------------------------
# Dovecot

# infra/dovecot/floodgate.conf's paths and port, and what a private instance uses instead
# (``{root}`` is the instance's directory, ``{lmtp_port}`` its LMTP port).
DOVECOT_PATHS = {
    "/etc/dovecot/floodgate/": "{root}/floodgate/",
    "port = 24\n": "port = {lmtp_port}\n",
}
# The private base above infra/dovecot/floodgate.conf: its own directories, log, users (a
# passwd-file), mail location and IMAP listener on loopback, no TLS (loopback only).
DOVECOT_PRIVATE = """\
# A private Dovecot (pipeline/bench/mailstack.py): this base, then infra/dovecot/floodgate.conf.
base_dir = {root}/run
state_dir = {root}/state
log_path = {log}
info_log_path = {log}
instance_name = dovecot-{imap_port}
protocols = imap lmtp
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_plugins =
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
  default_fields = uid={uid} gid={gid} home={root}/mail/%d/%n
}}
# The user's mailboxes (Debian's 10-mail.conf has this; floodgate.conf adds Junk and Trash to it).
namespace inbox {{
  inbox = yes
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}

"""
# What infra/dovecot/floodgate-report runs, and what stands in for it here.
REPORT_COMMAND = "/opt/floodgate/venv/bin/floodgate-report"
REPORT_SPOOL = "/var/spool/floodgate/reports"


def report_command(user: str = "nobody") -> str:
    """How ``user`` (the mail user) can run ``floodgate-report``: this virtual environment's
    script where the user may execute its interpreter, else the spool program as a file under the
    system's Python (it needs only the standard library)."""
    script = Path(sys.executable).parent / "floodgate-report"
    if script.exists() and reachable_by_others(Path(sys.executable)) and reachable_by_others(script):
        return shlex.quote(str(script))
    spool = ROOT / "pipeline" / "reports" / "spool.py"
    python = Path("/usr/bin/python3")
    if not (reachable_by_others(python) and reachable_by_others(spool, stat.S_IROTH)):
        raise RuntimeError(f"the mail user {user} can run neither {script} nor {python} {spool}")
    return f"{python} -I -S {shlex.quote(str(spool))}"


class Dovecot(_Log):
    """A private Dovecot: LMTP and IMAP on loopback, passwd-file users, IMAPSieve Junk reports
    spooled to ``spool`` by infra's floodgate-report (run as ``mail_user``)."""

    def __init__(self, root: Path | str | None = None, *, users: Mapping[str, str], spool: Path | None = None,
                 lmtp_port: int | None = None, imap_port: int | None = None, mail_user: str = "nobody",
                 mail_group: str = "nogroup") -> None:
        self.root = _usable_root(root, "fg-dovecot-", mail_user)
        self.users = dict(users)
        self.lmtp_port = lmtp_port or free_port()
        self.imap_port = imap_port or free_port()
        self.mail_user, self.mail_group = mail_user, mail_group
        self.spool = spool or self.root / "report-spool"
        self.config_file = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.mail_dir = self.root / "mail"
        self.floodgate_dir = self.root / "floodgate"
        self._proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        for d in (self.root / "run", self.root / "state", self.mail_dir, self.floodgate_dir / "bin"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.floodgate_dir, self.floodgate_dir / "bin"):
            d.chmod(0o755)
        shutil.chown(self.mail_dir, self.mail_user, self.mail_group)
        # The spool: the pipe program writes it as the mail user (infra: vmail:floodgate 2770).
        self.spool.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.spool, self.mail_user, self.mail_group)
        self.spool.chmod(0o2770)
        users = self.root / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{pw}::::::\n" for u, pw in self.users.items()))
        # Read by the auth worker, which runs as default_internal_user (dovecot), not by mail users.
        shutil.chown(users, "root", "dovecot")
        users.chmod(0o640)
        for name in ("report-spam.sieve", "report-ham.sieve"):
            shutil.copyfile(INFRA_DOVECOT / name, self.floodgate_dir / name)
        program = self.floodgate_dir / "bin" / "floodgate-report"
        text = (INFRA_DOVECOT / "floodgate-report").read_text()
        assert REPORT_COMMAND in text and REPORT_SPOOL in text, "infra/dovecot/floodgate-report changed"
        program.write_text(text.replace(REPORT_COMMAND, report_command(self.mail_user))
                           .replace(REPORT_SPOOL, shlex.quote(str(self.spool))))
        program.chmod(0o755)
        fragment = (INFRA_DOVECOT / "floodgate.conf").read_text()
        for old, new in DOVECOT_PATHS.items():
            assert old in fragment, f"infra/dovecot/floodgate.conf no longer has {old!r}"
            fragment = fragment.replace(old, new.format(root=self.root, lmtp_port=self.lmtp_port))
        self.config_file.write_text(DOVECOT_PRIVATE.format(
            root=self.root, log=self.log_path, host=LOOPBACK, imap_port=self.imap_port, uid=self.mail_user,
            gid=self.mail_group, users=users) + "# infra/dovecot/floodgate.conf\n" + fragment)
        for name in ("report-spam.sieve", "report-ham.sieve"):
            run(["sievec", "-c", str(self.config_file), str(self.floodgate_dir / name)])

    def start(self) -> Dovecot:
        self.write_config()
        # -F: the master stays our child, so stop() knows exactly which process to end.
        with open(self.root / "dovecot.stderr", "wb") as err:
            self._proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.config_file)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_for_port(self.imap_port)
            wait_for_port(self.lmtp_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {(self.root / 'dovecot.stderr').read_text()}"
                               f"{self.log()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()  # the master ends its children on SIGTERM
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def imap(self, user: str) -> imaplib.IMAP4:
        """A logged-in IMAP client for ``user``."""
        conn = imaplib.IMAP4(LOOPBACK, self.imap_port, timeout=30)
        conn.login(user, self.users[user])
        return conn


# --------------------------------------------------------------------------------------------------
# messages and mailboxes


def crlf(raw: bytes) -> bytes:
    """``raw`` with CRLF line endings and a final CRLF, as it travels over SMTP (corpus files have LF)."""
    out = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") else out + b"\r\n"



def uids(imap: imaplib.IMAP4, mailbox: str) -> list[bytes]:
    """The UIDs in ``mailbox`` (selected read-write)."""
    typ, _ = imap.select(mailbox)
    assert typ == "OK", mailbox
    return imap.uid("SEARCH", None, "ALL")[1][0].split()  # type: ignore[index,union-attr]


def fetch(imap: imaplib.IMAP4, uid: bytes, what: str = "BODY.PEEK[]") -> bytes:
    """One item of one message of the selected mailbox, as the server sent it."""
    data = imap.uid("FETCH", uid, f"({what})")[1]
    return next(part[1] for part in data if isinstance(part, tuple))  # type: ignore[index]


def mailbox(imap: imaplib.IMAP4, name: str) -> dict[bytes, bytes]:
    """UID -> the whole message, for every message in ``name``."""
    return {uid: fetch(imap, uid) for uid in uids(imap, name)}
