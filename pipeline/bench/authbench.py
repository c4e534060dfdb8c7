"""The verifier alone: CPU per message of sender authentication, cold and warm, against a private knotd.

``python -m pipeline.bench auth-verify [--domains 1000]``: one message from each of ``--domains``
sender domains (held-out corpus ham, From rewritten and signed; :mod:`pipeline.bench.authworld`:
SPF pass, DKIM rsa-sha256 pass, DMARC pass), 64 at a time through one
:class:`pipeline.smtp.auth.Verifier`:

* cold: every domain new (its SPF record, DKIM key and DMARC record fetched);
* warm: new messages (new signatures) from the same domains, the cache filled;
* campaign: one signed message repeated (a campaign sent to many recipients one by one).

CPU is this process's (``time.process_time``; knotd's excluded), per message.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
from typing import Any

from pipeline.bench import authworld
from pipeline.bench.dnsserver import KnotServer
from pipeline.smtp import auth

CONCURRENCY = 64
CLIENT = "127.5.0.1"


async def _run(v: auth.Verifier, mail: list[tuple[str, bytes]]) -> dict[str, Any]:
    sem = asyncio.Semaphore(CONCURRENCY)
    results: list[auth.AuthResults] = []

    async def one(mail_from: str, raw: bytes) -> None:
        async with sem:
            results.append(await v.verify(raw, client_ip=CLIENT, mail_from=mail_from,
                                          helo="mail." + mail_from.rpartition("@")[2]))

    q0 = v.dns.queries
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(f, r) for f, r in mail))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    dmarc: dict[str, int] = {}
    for r in results:
        dmarc[r.dmarc.result] = dmarc.get(r.dmarc.result, 0) + 1
    return {"messages": len(mail), "cpu_ms_per_message": round(1000 * cpu / len(mail), 3),
            "msgs_per_s": round(len(mail) / wall, 1), "dns_queries": v.dns.queries - q0, "dmarc": dmarc,
            "timed_out": sum(r.timed_out for r in results)}


def run(domains: int, profile: str = "", **cfg: Any) -> dict[str, Any]:
    from pipeline.bench.flood import load_mail
    from pipeline.bench.smtpload import crlf
    from pipeline.core import config

    world = authworld.build(domains)
    # Held-out corpus ham as the messages (their own headers: Received chains, list fields), From
    # rewritten to each sender domain and signed, as smtp-load --auth sends them.
    base = [crlf(m.raw) for m in load_mail(config.ROOT / "data")[0]]
    cold = authworld.signed_mail(world, base, 0, domains)
    warm = authworld.signed_mail(world, base[::-1], 0, domains)
    campaign = [cold[0]] * domains
    out: dict[str, Any] = {"domains": domains}
    with KnotServer(world.zones) as knot:
        config = auth.AuthConfig(authserv_id="mx.bench.test", nameservers=("127.0.0.1",), dns_port=knot.port, **cfg)

        async def go() -> None:
            v = auth.Verifier(config)
            prof = cProfile.Profile() if profile else None
            for name, mail in (("cold", cold), ("warm", warm), ("campaign", campaign)):
                if prof is not None and name == profile:
                    prof.enable()
                out[name] = await _run(v, mail)
                if prof is not None and name == profile:
                    prof.disable()
            await v.aclose()
            if prof is not None:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(40)

        asyncio.run(go())
    return out
