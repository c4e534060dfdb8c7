"""Flood admission at ingress (pure functions; the broker path is covered end to end)."""

import random
from dataclasses import replace

from pipeline.admission import RELEASE_FRACTION, STRESS_S, Admission, RateTracker
from pipeline.core import config, events


def test_a_steady_source_is_never_a_flood_even_a_busy_one():
    r = RateTracker(flood_rate=30.0)
    # One message a second for ten minutes, and a mailing list at 20 a second.
    assert not any(r.hit("client:192.0.2.1", float(t)) for t in range(600))
    assert not any(r.hit("addr:list@example.org", t / 20) for t in range(20 * 120))


def test_a_source_with_a_known_usual_rate_may_burst_but_not_surge():
    r = RateTracker(flood_rate=30.0, surge=4.0)
    t = 0.0
    for _ in range(20 * 60):  # a list at 20 a second for a minute: its usual rate is known
        t += 1 / 20
        assert not r.hit("addr:list@example.org", t)
    for _ in range(50 * 10):  # a burst to 50 a second (above the floor, below 4x its usual)
        t += 1 / 50
        assert not r.hit("addr:list@example.org", t)
    flagged = False
    for _ in range(200 * 5):  # a surge to 200 a second is a flood even for it
        t += 1 / 200
        flagged = r.hit("addr:list@example.org", t) or flagged
    assert flagged


def test_a_busy_source_that_once_peaked_is_released_when_it_sends_as_usual():
    r = RateTracker(flood_rate=30.0)
    t = 0.0
    for _ in range(400):  # 40 a second for 10 s: flagged
        t += 0.025
        r.hit("addr:list@example.org", t)
    assert r.hit("addr:list@example.org", t)
    for _ in range(18 * 30):  # back to its usual 18 a second: released within seconds
        t += 1 / 18
        flagged = r.hit("addr:list@example.org", t)
    assert not flagged


def test_a_burst_is_flagged_within_seconds_and_released_after_it_stops():
    r = RateTracker(flood_rate=30.0, tau_s=5.0)
    t, flagged_at = 0.0, None
    for _ in range(3000):  # 200 messages a second
        t += 0.005
        if r.hit("client:203.0.113.9", t) and flagged_at is None:
            flagged_at = t
    assert flagged_at is not None and flagged_at < 1.0
    # Silence, then one message: still flagged while the rate is above the release level...
    assert r.hit("client:203.0.113.9", t + 1.0)
    # ...and released once it has decayed below RELEASE_FRACTION of the threshold.
    assert r.rate("client:203.0.113.9", t + 60) < 30.0 * RELEASE_FRACTION
    assert not r.hit("client:203.0.113.9", t + 60)


def test_a_new_bot_is_caught_within_its_first_few_dozen_messages():
    # 24 bots sharing a flood at 5x capacity send ~68 a second each: the short-term rate alone
    # took ~1.2 s (~80 messages per bot) to cross the floor.
    r = RateTracker(flood_rate=30.0)
    hits = [r.hit("client:2001:db8:1::1", i / 68) for i in range(200)]
    assert hits.index(True) < 25
    assert all(hits[hits.index(True):])  # and it stays caught while it keeps sending


def test_a_short_burst_from_a_new_source_is_not_a_flood():
    r = RateTracker(flood_rate=30.0)
    # A list's digest or a retry queue: ten messages back to back, then its usual trickle.
    assert not any(r.hit("addr:list@example.org", 0.001 * i) for i in range(10))
    assert not any(r.hit("addr:list@example.org", 1.0 + i) for i in range(30))


def flooding(r: RateTracker, until: float) -> None:
    """A campaign sending 500 a second up to ``until``: the ingress is under stress."""
    t = until - 2.0
    while t < until:
        r.hit("campaign:abc", t)
        t += 0.002


def test_under_stress_a_new_bot_gets_only_a_couple_of_messages_through():
    # A diverse flood's 24 new bots at ~115 a second each, starting while a campaign is being
    # diverted: without the stress rule each got ~18 messages into the priority lane.
    r = RateTracker(flood_rate=55.0)
    flooding(r, 100.0)
    hits = [r.hit("client:2001:db8:7::1", 100.0 + i / 115) for i in range(50)]
    assert hits.index(True) <= 4
    assert all(hits[hits.index(True):])


def test_under_stress_a_source_with_history_keeps_its_burst_and_a_new_one_gets_it_back_later():
    r = RateTracker(flood_rate=30.0)
    for i in range(30):  # a list's usual trickle, one a second: it has history
        assert not r.hit("addr:list@example.org", float(i))
    flooding(r, 40.0)
    # Its digest, ten back to back, during the flood: still not a flood.
    assert not any(r.hit("addr:list@example.org", 40.0 + 0.001 * i) for i in range(10))
    # A new source sending back to back during the flood goes to bulk after its first three...
    assert [r.hit("addr:new@example.net", 40.5 + 0.001 * i) for i in range(5)] == [False] * 3 + [True] * 2
    # ...and once nothing has flooded for STRESS_S, a new source's burst is allowed again.
    later = 40.5 + STRESS_S + 5.0
    assert not any(r.hit("addr:other@example.net", later + 0.001 * i) for i in range(10))


def test_a_list_near_the_floor_that_bunches_up_keeps_its_lane():
    # 25 a second on average with random gaps (Poisson), from its first second: the burst check
    # may divert a few bunched messages, but the list is never stuck in bulk and learns its rate.
    rng = random.Random(3)
    r = RateTracker(flood_rate=30.0)
    t, flags = 0.0, []
    while t < 120:
        t += rng.expovariate(25)
        flags.append(r.hit("addr:list@example.org", t))
    assert sum(flags) < 0.02 * len(flags)
    assert not any(flags[-len(flags) // 2:])  # once its usual rate is known, nothing is diverted


def test_a_sustained_flood_never_becomes_the_flooders_normal():
    r = RateTracker(flood_rate=30.0)
    t = 0.0
    for _ in range(100 * 900):  # 100 a second for 15 minutes: the baseline does not learn it
        t += 0.01
        flagged = r.hit("client:203.0.113.9", t)
    assert flagged


def test_a_source_busy_for_a_long_time_may_stay_busy():
    r = RateTracker(flood_rate=30.0, surge=4.0)
    t = 0.0
    for _ in range(40 * 1200):  # 40 a second for 20 minutes: flagged at first...
        t += 1 / 40
        r.hit("client:198.51.100.7", t)
    # ...a steady source's baseline is learned only while it is not flagged, so it stays
    # flagged: a new high-volume sender must earn good standing (reputation), not just wait.
    assert r.hit("client:198.51.100.7", t + 1 / 40)


def test_hysteresis_keeps_a_source_flagged_just_below_the_threshold():
    r = RateTracker(flood_rate=30.0, tau_s=5.0)
    t = 0.0
    for _ in range(2000):
        t += 0.02  # 50/s: flagged
        r.hit("k", t)
    for _ in range(300):
        t += 1 / 25  # 25/s: below 30 but above 20, so no flapping back
        assert r.hit("k", t)


def test_idle_sources_are_forgotten():
    r = RateTracker()
    r.hit("a", 0.0)
    r.hit("b", 1000.0)
    r.prune(1000.0)
    assert len(r) == 1


def test_flooding_sources_go_to_bulk_but_known_good_senders_never_do():
    settings = config.load(env={})
    settings = replace(settings, admission=replace(settings.admission, flood_rate=30.0))
    admission = Admission(settings, follow_reputation=False)
    admission.good.keys = frozenset({"domain:lists.example.org"})

    def ev(sender: str, client: str, body: bytes) -> events.MailEvent:
        return events.new_event(events.Envelope(sender, ("u@example.com",), client), b"Subject: s\n\n" + body)

    t = 0.0
    lanes: dict[str, list[str]] = {"bot": [], "list": [], "friend": [], "freemail": []}
    for i in range(1000):  # 100 messages a second from one bot and from one known-good list
        t += 0.01
        lanes["bot"].append(admission.lane(ev("x@spam.example", "203.0.113.5", b"buy %d" % i), t))
        lanes["list"].append(admission.lane(ev("bounce@lists.example.org", "198.51.100.2", b"post %d" % i), t))
        # Many people at a big freemail domain, each from their own client: the domain is shared.
        lanes["freemail"].append(admission.lane(ev(f"u{i}@mail.example", f"192.0.2.{i % 250}", b"hi %d" % i), t))
        if i % 100 == 0:  # one message a second from a correspondent
            lanes["friend"].append(admission.lane(ev("bob@example.net", "198.51.100.9", b"hi %d" % i), t))
    assert lanes["bot"][:3] == ["priority"] * 3  # a burst takes a moment to be recognised
    assert lanes["bot"][-800:] == ["bulk"] * 800
    assert set(lanes["list"]) == {"priority"}
    assert set(lanes["freemail"]) == {"priority"}
    assert set(lanes["friend"]) == {"priority"}
    bot = events.new_event(events.Envelope("x@spam.example", ("u@example.com",), "203.0.113.5"), b"\n\nbuy")
    assert admission.topic(bot, t) == settings.topic("bulk")
    friend = events.new_event(events.Envelope("bob@example.net", ("u@example.com",), "198.51.100.9"), b"\n\nhi")
    assert admission.topic(friend, t) == settings.topic("inbound")
