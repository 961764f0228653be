"""The sample command writes ABO's layout: small/<2 hex>/<id>.png, images.csv.gz, labels."""

import csv
import gzip

from PIL import Image

from builder.sample import CLASS_NAMES, write_sample


def test_sample_writes_abo_layout_balanced_over_classes(tmp_path):
    assert write_sample(tmp_path, limit=50) == 50
    with gzip.open(tmp_path / "images.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image_id", "height", "width", "path"]
    assert len(rows) == 50
    for row in rows[:5]:
        folder, name = row["path"].split("/")
        assert len(folder) == 2 and name.startswith(folder) and name.endswith(".png")
        with Image.open(tmp_path / "small" / row["path"]) as image:
            assert image.size == (int(row["width"]), int(row["height"])) == (28, 28)
    with open(tmp_path / "labels.csv") as handle:
        labels = list(csv.DictReader(handle))
    assert {row["label_name"] for row in labels} == set(CLASS_NAMES)
    assert all(sum(r["label"] == str(c) for r in labels) == 5 for c in range(10))
