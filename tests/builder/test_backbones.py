"""The converted backbones, with their own ImageNet classifiers, name the right class for real photos."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from builder.backbones import SPECS, build_backbone

EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2"])
def test_converted_backbone_classifies_real_photos(backbone):
    spec = SPECS[backbone]
    model = build_backbone(backbone, 224, with_classifier=True)
    photos = np.stack([np.asarray(Image.fromarray(photo).resize((224, 224)), np.float32)
                       for photo in (data.chelsea(), data.coffee())])
    normalised = (photos - np.array(spec.mean)) / np.array(spec.std)
    _, logits = model.predict(normalised, verbose=0)
    cat_top1, coffee_top1 = np.argmax(logits, axis=1)
    assert cat_top1 in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert coffee_top1 == ESPRESSO
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert probabilities[1, ESPRESSO] > 0.5
