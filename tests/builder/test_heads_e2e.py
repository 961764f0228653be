"""Build options that change the model (GeM pooling, the LDA head on product types), built and served for
real: the server computes what the builder indexed. Images over the pixel limit are dropped with a reason."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from builder.model import LabelError
from client.library import ImageSimilarityClient
from lookalike import artifacts
from tests.builder import fake_build

pytestmark = pytest.mark.e2e


def test_gem_and_lda_are_served_exactly_as_built(built, served, catalogue):
    """The session's build (tests/conftest.py) has GeM pooling and the LDA head."""
    version_dir = built / artifacts.read_current(built)
    manifest = json.loads((version_dir / artifacts.MANIFEST).read_text())
    assert manifest["pooling"] == "gem" and manifest["head"] == "lda" and manifest["dimension"] == 128
    assert manifest["head_requested"] == "lda"
    # The sample's ten classes plus the test listings' types (BANNER's images are all dropped).
    assert manifest["head_fit"]["label_key"] == "product_type" and manifest["head_fit"]["labels"] >= 11
    images = pd.read_parquet(version_dir / artifacts.IMAGES_FILE)
    vectors = np.load(version_dir / artifacts.VECTORS_FILE)
    with ImageSimilarityClient(served.address) as client:
        rows = images.iloc[[0, 40, 301]]
        vectors_served = client.embed([catalogue / "small" / path for path in rows["path"]])
        assert np.allclose(vectors_served, vectors[rows["row"].to_numpy()], atol=1e-4)
        # Learned from product types: neighbours share the query's type far above chance (0.1).
        products = images.drop_duplicates("product_id").iloc[:30]
        same_type = [match.label == row["label_name"] for _, row in products.iterrows()
                     for match in client.find_similar(product_id=row["product_id"], k=5)]
        assert np.mean(same_type) > 0.6


def test_a_supervised_head_refuses_a_catalogue_without_labels_and_huge_images_are_dropped(tmp_path):
    """In process, with the fake trunk (tests/builder/fake_build.py): the refusal comes before any model runs
    and the drop from the scan. That a build error is one line from the CLI: tests/test_cli_errors.py."""
    images = tmp_path / "photos"
    folder = images / "small" / "aa"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for n in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"photo-{n}.png")
    # 49 MP of one grey: a few kB on disk, over the 40 MP a build (and the server) decodes.
    Image.new("L", (7000, 7000), 128).save(folder / "poster.png")
    out = tmp_path / "ARTIFACTS"
    with pytest.raises(LabelError) as refused:
        fake_build.run(images, out, head="lda")
    # Refused once the catalogue is read, before any image is embedded.
    assert "'product_type', which this catalogue does not have (its attributes: none)" in str(refused.value)
    assert not (out / ".features" / "models").exists() or not any((out / ".features" / "models").rglob("*.parquet"))
    assert not (out / artifacts.CURRENT).exists()
    manifest = fake_build.run(images, out, neighbours=0)
    version_dir = out / artifacts.read_current(out)
    assert manifest["counts"]["indexed"] == 6 and manifest["counts"]["dropped_by_reason"] == {"too large": 1}
    dataset = pd.read_parquet(version_dir / artifacts.DATASET_FILE).set_index("image_id")
    assert dataset.loc["poster", "drop_reason"] == "too large: 7000x7000 pixels (49.0 MP) is over the limit of 40 MP"
