"""A build with the auto head on product types and database-side augmentation (in process, the fake trunk):
what it chose and why is in the manifest, the stored vectors are the model's augmented, and the served
model is the model's own, unaugmented."""

import numpy as np
import pandas as pd
import pytest

from builder.augment import augment
from lookalike import artifacts
from lookalike.preprocess import Preprocessor
from lookalike.runner import SavedModelEmbedder
from tests.builder import fake_build

pytestmark = pytest.mark.e2e


def test_an_augmented_auto_build_stores_augmented_vectors_and_serves_the_models_own(tmp_path, catalogue):
    out = tmp_path / "ARTIFACTS"
    manifest = fake_build.run(catalogue, out, augment_neighbours=3, neighbours=0, chunk_size=256)
    fit = manifest["head_fit"]
    figures = fit["held_out"]["precision_at_10"]
    assert manifest["head_requested"] == "auto" and manifest["head"] == fit["chosen"]
    assert set(figures) == {"lda", "metric"}
    assert fit["chosen"] == ("metric" if figures["metric"] > figures["lda"] + fit["held_out"]["margin"] else "lda")
    assert fit["held_out"]["products"] >= 1 and fit["label_key"] == "product_type"
    assert manifest["augmentation"]["neighbours"] == 3 and manifest["config"]["augment_neighbours"] == 3
    assert "augment" in manifest["timings_seconds"]

    version_dir = out / manifest["version"]
    images = pd.read_parquet(version_dir / artifacts.IMAGES_FILE)
    stored = np.load(version_dir / artifacts.VECTORS_FILE)
    preprocess = Preprocessor()
    pixels = np.stack([preprocess((catalogue / "small" / path).read_bytes()) for path in images["path"]])
    model = SavedModelEmbedder(version_dir / artifacts.MODEL_DIR)
    served = np.concatenate([model(pixels[start:start + 64]) for start in range(0, len(pixels), 64)])
    assert np.allclose(stored, augment(served, 3), atol=1e-4)
    assert np.abs(stored - served).max() > 0.05  # the model itself is not augmented
