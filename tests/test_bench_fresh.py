"""bench/fresh.py's pure helpers: taking delta rows from products, merging load reports, the section."""

import io

import pytest
from PIL import Image

from bench.fresh import (
    FRESH_BEGIN,
    FRESH_END,
    median_of_rounds,
    merge_reports,
    one_pixel_changed,
    section,
    take_products,
)


def test_take_products_goes_round_the_products_and_stops_at_exactly_the_rows():
    taken = take_products([2, 1, 3], 10)
    assert taken == [(0, 2), (1, 1), (2, 3), (0, 2), (1, 1), (2, 1)]
    assert sum(count for _, count in taken) == 10
    assert take_products([2, 1], 0) == []
    assert take_products([0, 4], 3) == [(1, 3)]
    with pytest.raises(ValueError):
        take_products([0, 0], 1)


def test_merge_reports_sums_codes_and_counts_everything_not_ok_as_failed():
    merged = merge_reports([{"codes": {"OK": 5}}, {"codes": {"OK": 3, "UNAVAILABLE": 1}}, {"codes": {}}])
    assert merged == {"runs": 3, "requests": 9, "codes": {"OK": 8, "UNAVAILABLE": 1}, "failed": 1}


def test_median_of_rounds():
    runs = [{"qps": 10, "p50_ms": 1.0, "p99_ms": 9.0}, {"qps": 30, "p50_ms": 3.0, "p99_ms": 2.0},
            {"qps": 20, "p50_ms": 2.0, "p99_ms": 5.0}]
    assert median_of_rounds(runs) == {"qps": 20, "p50_ms": 2.0, "p99_ms": 5.0}


def test_one_pixel_changed_gives_new_bytes_of_the_same_image_but_one_pixel():
    image = Image.new("L", (4, 4), 100)
    data = io.BytesIO()
    image.save(data, format="PNG")
    changed = [Image.open(io.BytesIO(one_pixel_changed(data.getvalue(), variant))) for variant in (0, 5)]
    for variant, found in zip((0, 5), changed, strict=True):
        differing = [(x, y) for x in range(4) for y in range(4) if found.getpixel((x, y)) != 100]
        assert differing == [(variant % 4, variant // 4)]
    assert changed[0].tobytes() != changed[1].tobytes()


def test_section_is_between_its_markers_and_says_failed_and_embedded():
    run = {"runs": [{"qps": 100.0, "p50_ms": 1.0, "p99_ms": 4.0, "codes": {"OK": 800}}]}
    result = {
        "command": "python -m bench.fresh", "seconds": 600, "watch_interval_s": 2.0,
        "catalogue": {"products": 1000, "images": 1933},
        "machine": {"cores": 2, "load_average_at_start": [3.0, 3, 3], "load_average_at_end": [4.0, 4, 4]},
        "adds": [{"products": 1, "images": 2, "add_wall_s": 9.5, "published_after_start_s": 8.0, "embedded": 2,
                  "features_cached": 2, "visible_after_publish_s": [1.2, None], "visible_after_return_s": [-0.3, None],
                  "replicas": [{"poll_errors": 0}, {"poll_errors": 1}]}],
        "load_during_adds": {"failed": 0, "requests": 1234, "codes": {"OK": 1234}, "concurrency_per_replica": 2},
        "latency": {"concurrency": 2, "duration_s": 8.0, "rounds": 1, "by_delta_rows": {
            "0": {**run, "median": median_of_rounds(run["runs"]), "plans": {"neighbour_list": 800}, "failed": 0}}},
        "next_build": {"images_added": 2, "embedded": 0, "from_cache": 1935, "decoded": 2, "images_indexed": 1935,
                       "seconds": 80.0}}
    lines = section(result)
    assert lines[0] == FRESH_BEGIN and lines[-1] == FRESH_END
    text = "\n".join(lines)
    assert "**0** of 1,234" in text and "**0 embedded**" in text and "| 1.2, - | -0.3, - |" in text
    assert "failed polls: 1." in text
