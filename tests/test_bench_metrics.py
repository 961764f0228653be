"""The benchmark's quality metrics on hand-made cases."""

import numpy as np
import pytest

from bench.quality import precision_and_map_at_10


def test_perfect_and_useless_rankings():
    labels = np.repeat(np.arange(10), 10)
    vectors = np.eye(10)[labels] + 0.001 * np.arange(100)[:, None]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    precision, average = precision_and_map_at_10(vectors, labels, vectors[::10], labels[::10])
    assert precision == 1.0 and abs(average - 1.0) < 1e-9
    wrong = (labels[::10] + 1) % 10
    precision, average = precision_and_map_at_10(vectors, labels, vectors[::10], wrong)
    assert precision == 0.0 and average == 0.0


def test_map_rewards_relevant_items_ranked_first():
    catalogue = np.eye(12)
    labels = np.array([0] * 5 + [1] * 7)
    relevant_first = np.array([[1.0, 0.99, 0.98, 0.97, 0.96, 0.6, 0.59, 0.58, 0.57, 0.56, 0.1, 0.1]])
    relevant_last = np.array([[0.6, 0.59, 0.58, 0.57, 0.56, 1.0, 0.99, 0.98, 0.97, 0.96, 0.1, 0.1]])
    first = precision_and_map_at_10(catalogue, labels, relevant_first, np.array([0]))
    last = precision_and_map_at_10(catalogue, labels, relevant_last, np.array([0]))
    assert first[0] == last[0] == 0.5
    assert first[1] == 1.0 and last[1] < first[1]


def test_the_reliability_section_replaces_its_predecessor_and_reads_the_chaos_figures(tmp_path):
    from bench.report import RELIABILITY_BEGIN, RELIABILITY_END, write_reliability_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# b\n\n## Serving\n\nkept\n\n{RELIABILITY_BEGIN}\n## Reliability\n\nold figures\n"
                    f"{RELIABILITY_END}\n\n## Reading the figures\n\nkept too\n")
    chaos = {"duration_s": 1800.0, "callers": 6, "slow_callers": 2, "requests": 52_000, "ok": 30_100,
             "answers_checked": 30_100, "wrong_answers": 0, "unexpected_errors": 0, "availability_went_back": 0,
             "crashes": 0, "server_exit_code": None, "cancelled_mid_flight": 9_000, "codes": {"OK": 30_100},
             "swaps_written": 1_700, "swaps_applied": 160, "reloads_refused": 0, "sighups": 5_000,
             "availability_changes": 40, "products_hidden": 11_000, "products_shown": 10_900,
             "hostile": {"requests": 7_000, "kinds": 12, "unclear": 0},
             "memory_mib": {"warmup_s": 300.0, "window_s": 300.0, "last_t": 1795.0, "samples": 360,
                            "rss": {"first": 1000.0, "warm": 1100.0, "last": 1120.0, "max": 1150.0,
                                    "growth_after_warmup_pct": 1.8, "trend_mib_per_10min": 4.2},
                            "anon": {"first": 600.0, "warm": 690.0, "last": 700.0, "max": 720.0,
                                     "growth_after_warmup_pct": 1.4, "trend_mib_per_10min": -0.3},
                            "file_artifacts_mapped": {"first": 28.3, "warm": 1.8, "last": 28.3, "max": 30.1,
                                                      "growth_after_warmup_pct": 1472.2, "trend_mib_per_10min": 0}}}
    write_reliability_section({"command": "python -m bench.soak", "started_at": "2026-12-01", "chaos": chaos}, path)
    text = path.read_text()
    assert "old figures" not in text and text.count("## Reliability") == 1
    write_reliability_section({"command": "python -m bench.soak", "started_at": "2026-12-01", "chaos": chaos}, path)
    assert path.read_text() == text  # in place, again and again
    assert "kept\n" in text and text.endswith("## Reading the figures\n\nkept too\n")
    assert "| wrong answers / unexpected errors / availability going back | 0 / 0 / 0 |" in text
    assert "MiB per 10 minutes): total RSS | 1,000, 1,100, 1,120, 1,150 (+1.8%; +4.2) |" in text
    assert "allocator arenas | 600, 690, 700, 720 (+1.4%; -0.3) |" in text
    assert "| size of the ARTIFACTS files mapped, MiB: max | 30 |" in text
    assert "From the first sample to the median after the warm-up, MiB: total +100; anonymous +90," in text


def test_chaos_experiments_set_numeric_and_yes_no_fields_only():
    from bench.chaos import _config_value

    assert _config_value("callers=0") == ("callers", 0)
    assert _config_value("swap_every_s=1e9") == ("swap_every_s", 1e9)
    assert _config_value("hostile=0") == ("hostile", False) and _config_value("hostile=yes") == ("hostile", True)
    for wrong in ("server_command=lookalike-serve", "no_such_field=1"):
        with pytest.raises(ValueError, match="not a numeric or yes/no field"):
            _config_value(wrong)
