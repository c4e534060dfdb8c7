"""Pieces of the flood benchmark (``make bench-flood``) that can be checked without running it."""

from __future__ import annotations

from pipeline.bench import flood
from pipeline.sinks import maildir
from tests.kafka_helpers import wait_for


def test_the_disk_probe_times_real_maildir_deliveries(tmp_path):
    box = tmp_path / "probe"
    probe = flood.DiskProbe(box)
    probe.start()
    wait_for(lambda: len(probe.samples) >= 3, timeout=30, what="three probe writes")
    samples = probe.finish()
    assert not probe.is_alive()
    delivered = sorted(p.name for p in (box / "new").iterdir())
    assert len(delivered) == len(samples) >= 3  # every sample is a message durably in new/
    assert all(maildir.delivered(box, name) for name in delivered)
    assert all(seconds > 0 for _, seconds in samples)
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)


def _summary_of(phase_name: str, phase: dict) -> tuple[str, str]:
    """The header and the one row that flood.summary prints for a report with a single phase."""
    report = {"scenario": {"capacity": 500.0, "base_rate": 125.0, "flood_rate": 2500.0, "flood_s": 20.0,
                           "messages": 3},
              "results": {"floodgate": {"phases": {phase_name: phase}, "ledger": "3 sent", "drain_s": 1.0,
                                        "ok": True}}}
    header, row = flood.summary(report).splitlines()[3:5]
    return header, row


def test_the_summary_shows_the_disk_beside_ham():
    phase = {"legit_ham": flood.stats([0.1, 0.2]), "spam": flood.stats([5.0]), "disk": flood.stats([0.002, 0.3])}
    header, row = _summary_of("1-before", phase)
    assert header.split()[-4:] == ["disk", "p99", "disk", "max"]
    assert row.split()[-2:] == ["0.300", "0.300"]  # p99 and max of the two probe writes


def test_ham_that_met_a_disk_stall_is_left_out_of_the_clear_p99_only():
    # Probe writes (start, seconds): one stall from t=10.0 to 10.5, fast writes around it.
    disk = [(9.0, 0.001), (10.0, 0.5), (11.0, 0.002), (12.0, flood.DISK_STALL_S)]  # the last is not over
    windows = flood.stall_windows(disk)
    assert windows == [(10.0, 10.5)]
    assert not flood.clear_of(windows, 9.9, 10.2)  # on its way when the disk stopped
    assert not flood.clear_of(windows, 10.1, 10.3)  # wholly inside the stall
    assert not flood.clear_of(windows, 9.0, 11.0)  # around it
    assert flood.clear_of(windows, 9.0, 9.95)  # in its mailbox before
    assert flood.clear_of(windows, 10.6, 10.7)  # accepted after


def test_the_summary_shows_all_ham_and_the_clear_p99_side_by_side():
    phase = {"legit_ham": flood.stats([0.1, 0.2, 0.9]), "legit_ham_clear": flood.stats([0.1, 0.2]),
             "disk": flood.stats([0.002, 0.6])}
    header, row = _summary_of("2-during", phase)
    columns = header.replace(" p", "_p").replace("ham max", "ham_max").split()
    values = dict(zip(columns, row.split(), strict=False))
    assert values["ham_p99"] == "0.900" and values["clear_p99"] == "0.200"
