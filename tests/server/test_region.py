"""Query regions: the server crops the decoded image before the shared preprocessing, so a region query equals a
query with the cropped image; every wrong region is INVALID_ARGUMENT."""

import math

import grpc
import numpy as np
import pytest

from lookalike.preprocess import Preprocessor, crop, decode, region_box
from lookalike.v1 import lookalike_pb2 as pb
from tests.helpers import png_bytes
from tests.server.fakes import close_in_process, serve_in_process

GROUPS = [[p, p + 20] for p in range(20)]
PHOTO = np.random.default_rng(11).integers(0, 255, (30, 40, 3), dtype=np.uint8)  # 40 wide, 30 high
REGION = (0.25, 0.2, 0.75, 0.9)  # pixels 10..30 across, 6..27 down


@pytest.mark.parametrize(("region", "box"), [
    ((0.25, 0.2, 0.75, 0.9), (10, 6, 30, 27)),
    ((0, 0, 1, 1), (0, 0, 40, 30)),
    ((0.26, 0.21, 0.74, 0.89), (10, 6, 30, 27)),  # every pixel the box touches is in
    ((0.5, 0.5, 0.5001, 0.5001), (20, 15, 21, 16)),  # a sliver is still one pixel
    ((0.99, 0.99, 1, 1), (39, 29, 40, 30)),
])
def test_a_relative_region_covers_the_pixels_it_touches(region, box):
    assert region_box(region, 40, 30) == box
    left, top, right, bottom = box
    assert np.array_equal(crop(PHOTO, region), PHOTO[top:bottom, left:right])


def test_float32_edges_on_pixel_boundaries_add_no_pixel():
    region = tuple(float(np.float32(v)) for v in (0.7, 0.1, 0.9, 0.3))
    assert region_box(region, 40, 30) == (28, 3, 36, 9)
    assert region_box(tuple(float(np.float32(v)) for v in (0.1, 0.3, 0.3, 0.7)), 1000, 100) == (100, 30, 300, 70)


def test_the_shared_preprocessing_of_a_region_is_that_of_the_cropped_image():
    preprocess = Preprocessor()
    cropped = png_bytes(PHOTO[6:27, 10:30])
    assert np.array_equal(preprocess(png_bytes(PHOTO), REGION), preprocess(cropped))
    assert np.array_equal(decode(cropped), PHOTO[6:27, 10:30])


@pytest.fixture
async def served(tmp_path):
    stub, images, _, parts = await serve_in_process(tmp_path, groups=GROUPS)
    yield stub, images
    await close_in_process(parts)


def _region(values=REGION) -> pb.Region:
    return pb.Region(x_min=values[0], y_min=values[1], x_max=values[2], y_max=values[3])


async def test_every_image_query_with_a_region_equals_the_cropped_image(served):
    stub, _ = served
    photo, cropped = png_bytes(PHOTO), png_bytes(PHOTO[6:27, 10:30])
    embedded = await stub.Embed(pb.EmbedRequest(images=[photo, photo], regions=[_region(), _region((0, 0, 1, 1))]))
    reference = await stub.Embed(pb.EmbedRequest(images=[cropped, photo]))
    for got, expected in zip(embedded.vectors, reference.vectors, strict=True):
        assert np.allclose(got.values, expected.values, atol=1e-5)
    assert not np.allclose(embedded.vectors[0].values, embedded.vectors[1].values, atol=1e-3)
    similar = await stub.FindSimilar(pb.FindSimilarRequest(image=photo, region=_region(), k=6))
    expected = await stub.FindSimilar(pb.FindSimilarRequest(image=cropped, k=6))
    assert [(m.product_id, round(m.score, 5)) for m in similar.matches] == [
        (m.product_id, round(m.score, 5)) for m in expected.matches]
    whole = await stub.FindSimilar(pb.FindSimilarRequest(image=photo, k=6))
    assert [m.score for m in whole.matches] != [m.score for m in similar.matches]
    recommended = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(image=photo, region=_region()), pb.Example(product_id="prod-003")], k=5))
    expected = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(image=cropped), pb.Example(product_id="prod-003")], k=5))
    assert [m.product_id for m in recommended.matches] == [m.product_id for m in expected.matches]


@pytest.mark.parametrize(("region", "message"), [
    ((0.5, 0.2, 0.5, 0.9), "region (0.5, 0.2, 0.5, 0.9) is empty: x_min < x_max and y_min < y_max"),
    ((0.1, 0.9, 0.6, 0.2), "is empty"),
    ((0.1, 0.2, 1.2, 0.9), "region (0.1, 0.2, 1.2, 0.9) is out of range: every coordinate is relative, in 0..1"),
    ((-0.1, 0.2, 0.5, 0.9), "is out of range"),
    ((math.nan, 0.2, 0.5, 0.9), "is out of range"),
])
async def test_a_wrong_region_is_invalid_argument_in_every_rpc(served, region, message):
    stub, images = served
    calls = [(stub.Embed, pb.EmbedRequest(images=[images[0]], regions=[_region(region)])),
             (stub.FindSimilar, pb.FindSimilarRequest(image=images[0], region=_region(region))),
             (stub.Recommend, pb.RecommendRequest(positive=[pb.Example(image=images[0], region=_region(region))]))]
    for method, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


@pytest.mark.parametrize(("method", "request_", "message"), [
    ("FindSimilar", pb.FindSimilarRequest(product_id="prod-001", region=pb.Region(x_max=1, y_max=1)),
     "a region applies to an image query only"),
    ("Recommend", pb.RecommendRequest(positive=[pb.Example(product_id="prod-001", region=pb.Region(x_max=1, y_max=1))]),
     "example 0: a region applies to an image example only"),
    ("Embed", pb.EmbedRequest(images=[b"x", b"y"], regions=[pb.Region(x_max=1, y_max=1)]),
     "1 regions for 2 images: send none or one per image"),
])
async def test_a_region_where_none_applies_is_invalid_argument(served, method, request_, message):
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
