"""Flood admission at ingress (pure functions; the broker path is covered end to end)."""

from pipeline.admission import FLOOD_RATE, RELEASE_FRACTION, RateTracker


def test_a_steady_trickle_is_never_a_flood():
    r = RateTracker(flood_rate=5.0)
    # One message a second for ten minutes: rate ~1/s, far below 5/s.
    assert not any(r.hit("client:192.0.2.1", float(t)) for t in range(600))


def test_a_burst_is_flagged_within_seconds_and_released_after_it_stops():
    r = RateTracker(flood_rate=5.0, tau_s=5.0)
    t, flagged_at = 0.0, None
    for _ in range(2000):  # 100 messages a second
        t += 0.01
        if r.hit("client:203.0.113.9", t) and flagged_at is None:
            flagged_at = t
    assert flagged_at is not None and flagged_at < 1.0
    # Silence, then one message: still flagged while the rate is above the release level...
    assert r.hit("client:203.0.113.9", t + 1.0)
    # ...and released once it has decayed below RELEASE_FRACTION of the threshold.
    assert r.rate("client:203.0.113.9", t + 60) < FLOOD_RATE * RELEASE_FRACTION
    assert not r.hit("client:203.0.113.9", t + 60)


def test_hysteresis_keeps_a_source_flagged_just_below_the_threshold():
    r = RateTracker(flood_rate=5.0, tau_s=5.0)
    t = 0.0
    for _ in range(500):
        t += 0.1  # 10/s: flagged
        r.hit("k", t)
    for _ in range(300):
        t += 0.25  # 4/s: below 5 but above 2.5, so no flapping back
        assert r.hit("k", t)


def test_idle_sources_are_forgotten():
    r = RateTracker()
    r.hit("a", 0.0)
    r.hit("b", 1000.0)
    r.prune(1000.0)
    assert len(r) == 1


def test_flooding_sources_go_to_bulk_but_known_good_senders_never_do():
    from pipeline import config, events
    from pipeline.admission import Admission

    settings = config.load(env={})
    admission = Admission(settings, flood_rate=5.0, follow_reputation=False)
    admission.good.keys = frozenset({"domain:lists.example.org"})

    def ev(sender: str, client: str, body: bytes) -> events.MailEvent:
        return events.new_event(events.Envelope(sender, ("u@example.com",), client), b"Subject: s\n\n" + body)

    t = 0.0
    lanes = {"bot": [], "list": [], "friend": []}
    for i in range(300):  # 50 messages a second from one bot and from one mailing list
        t += 0.02
        lanes["bot"].append(admission.lane(ev("x@spam.example", "203.0.113.5", b"buy %d" % i), t))
        lanes["list"].append(admission.lane(ev("bounce@lists.example.org", "198.51.100.2", b"post %d" % i), t))
        if i % 50 == 0:  # one message a second from a correspondent
            lanes["friend"].append(admission.lane(ev("bob@example.net", "198.51.100.9", b"hi %d" % i), t))
    assert lanes["bot"][:3] == ["priority"] * 3  # a burst takes a moment to be recognised
    assert lanes["bot"][-200:] == ["bulk"] * 200
    assert set(lanes["list"]) == {"priority"}
    assert set(lanes["friend"]) == {"priority"}
    bot = events.new_event(events.Envelope("x@spam.example", ("u@example.com",), "203.0.113.5"), b"\n\nbuy")
    assert admission.topic(bot, t) == settings.topic("bulk")
    friend = events.new_event(events.Envelope("bob@example.net", ("u@example.com",), "198.51.100.9"), b"\n\nhi")
    assert admission.topic(friend, t) == settings.topic("inbound")
