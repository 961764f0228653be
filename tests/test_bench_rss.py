"""The soak's memory samples: /proc fields read, file-backed pages split, growth after the warm-up."""

import os
from pathlib import Path

import pytest

from bench import rss

STATUS = """Name:\tlookalike-serve
VmPeak:\t 3000000 kB
VmRSS:\t  1048576 kB
RssAnon:\t  786432 kB
RssFile:\t  257024 kB
RssShmem:\t    5120 kB
Threads:\t42
"""


def _mapping(header: str, rss_kib: int, anonymous_kib: int) -> str:
    return f"{header}\nSize:  {rss_kib * 2} kB\nRss:  {rss_kib} kB\nAnonymous:  {anonymous_kib} kB\nVmFlags: rd mr\n"


def test_status_fields_in_mib():
    assert rss.parse_status(STATUS) == {"rss": 1024.0, "anon": 768.0, "file": 251.0, "shmem": 5.0}
    assert rss.parse_status("Name:\tx\nVmRSS:\t2048 kB\n") == {"rss": 2.0}


def test_smaps_splits_artifacts_from_other_files_and_leaves_anonymous_out(tmp_path):
    vectors = tmp_path / "ARTIFACTS" / "v1" / "vectors.npy"
    vectors.parent.mkdir(parents=True)
    vectors.write_bytes(b"\0" * (3 << 20))
    smaps = "".join([
        _mapping(f"7f0000000000-7f0000300000 r--s 00000000 fe:00 12 {vectors}", 2048, 0),
        _mapping(f"7f0000400000-7f0000500000 r--s 00000000 fe:00 12 {vectors}", 1024, 0),  # mapped twice
        _mapping("7f1000000000-7f1000100000 r-xp 00000000 fe:00 13 /usr/lib/libtensorflow_framework.so.2", 4096, 0),
        # A library's data copied on write: anonymous, as RssAnon counts it.
        _mapping("7f1000200000-7f1000300000 rw-p 00000000 fe:00 13 /usr/lib/libtensorflow_framework.so.2", 512, 256),
        _mapping("7f2000000000-7f2000100000 rw-p 00000000 00:00 0 ", 8192, 8192),
        _mapping("7f3000000000-7f3000100000 rw-p 00000000 00:00 0                  [heap]", 1024, 1024),
        _mapping("7f4000000000-7f4000100000 rw-s 00000000 00:01 9 /memfd:arena (deleted)", 300, 0),
    ])
    split = rss.parse_smaps(smaps, tmp_path / "ARTIFACTS")
    assert split["file_artifacts"] == 3.0 and split["file_artifacts_mapped"] == 3.0
    assert split["file_other"] == 4.25
    assert split["file_other_mapped"] == 0.0  # the library's path does not exist here


def test_a_live_process_sums_to_its_status():
    taken = rss.sample(os.getpid(), root=Path(__file__).parent)
    assert taken["processes"] >= 1 and taken["rss"] > 0 and taken["anon"] > 0
    # smaps and status are read a moment apart: allow for a few pages either way.
    assert abs(taken["file_artifacts"] + taken["file_other"] - taken["file"]) < 4
    assert rss.sample(2**22 + 1) is None  # above Linux's largest pid_max: never a process


def test_growth_is_measured_between_medians_after_the_warm_up_and_the_trend_finds_a_slope():
    # Every 5 s for 30 minutes: a rise over the first 2 minutes, then flat with spikes (requests in flight) in
    # rss, and a steady 1 MiB a minute in anon.
    samples = [{"t": t, "rss": 1000.0 + min(t, 120) + (80 if t % 60 == 0 else 0), "anon": 600.0 + min(t, 100) + t / 60,
                "processes": 1} for t in range(0, 1800, 5)]
    samples[0]["file_artifacts"] = 10.0  # detailed fields are in some samples only
    samples[60]["file_artifacts"] = samples[-1]["file_artifacts"] = 20.0
    figures = rss.summary(samples, warmup_s=300, window_s=300)
    assert (figures["last_t"], figures["samples"], figures["window_s"]) == (1795, 360, 300)
    assert figures["rss"] == {"first": 1080.0, "warm": 1120.0, "last": 1120.0, "max": 1200.0,
                              "growth_after_warmup_pct": 0.0, "trend_mib_per_10min": pytest.approx(0, abs=1)}
    anon = figures["anon"]
    assert anon["first"] == 600.0 and anon["trend_mib_per_10min"] == 10.0
    # Medians of [300, 600) and (1495, 1795]: 447.5 s and 1647.5 s.
    assert anon["warm"] == pytest.approx(707.5, abs=0.05) and anon["last"] == pytest.approx(727.5, abs=0.05)
    assert anon["growth_after_warmup_pct"] == pytest.approx(100 * 20 / 707.5, abs=0.05)
    assert figures["file_artifacts"]["warm"] == 20.0 and figures["file_artifacts"]["growth_after_warmup_pct"] == 0
    assert [s["t"] for s in figures["series"]] == list(range(0, 1800, 60))
    assert rss.summary([], 300) == {}
    short = rss.summary(samples[:20], warmup_s=300)  # a run shorter than the warm-up: no growth to speak of
    assert short["anon"]["warm"] is None and short["anon"]["last"] is None
    assert short["anon"]["growth_after_warmup_pct"] is None and short["anon"]["trend_mib_per_10min"] is None


def test_growth_pct():
    assert rss.growth_pct(1000, 1047) == 4.7 and rss.growth_pct(0, 5) == 0.0
