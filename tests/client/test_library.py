"""Client misuse fails at once, before any network call; no TensorFlow or Spark import."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import Clause, ImageId, ImageSimilarityClient, Range, any_of, in_range, none_of
from client.cli import _clause, _info_text
from client.library import SERVICE_CONFIG, _recommend_request, _similar_request, image_bytes
from client.loadgen import LoadConfig, parse_mix
from lookalike.v1 import lookalike_pb2 as pb


def test_client_package_imports_neither_tensorflow_nor_spark():
    code = ("import sys, client, client.cli, client.loadgen; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'pyspark', 'keras', 'annoy')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_images_may_be_paths_bytes_or_pil(tmp_path):
    image = Image.new("RGB", (4, 4), "red")
    image.save(tmp_path / "x.png")
    assert image_bytes(tmp_path / "x.png") == (tmp_path / "x.png").read_bytes()
    assert image_bytes(str(tmp_path / "x.png")).startswith(b"\x89PNG")
    assert image_bytes(image).startswith(b"\x89PNG")
    assert image_bytes(b"abc") == b"abc"


@pytest.mark.parametrize("bad, error", [(None, TypeError), (42, TypeError), (b"", ValueError),
                                        ("/no/such/file.png", FileNotFoundError),
                                        (np.zeros((2, 2)), TypeError)])
def test_bad_images_fail_fast(bad, error):
    with pytest.raises(error):
        image_bytes(bad)


def test_find_similar_misuse_fails_fast():
    client = ImageSimilarityClient("127.0.0.1:1")  # nothing listens: misuse must fail before calling
    with pytest.raises(ValueError, match="exactly one"):
        client.find_similar(b"x", item_id="a")
    with pytest.raises(ValueError, match="exactly one"):
        client.find_similar()
    with pytest.raises(ValueError, match="k must be"):
        client.find_similar(item_id="a", k=0)
    with pytest.raises(ValueError, match="host:port"):
        ImageSimilarityClient("localhost")
    client.close()


def test_filters_become_one_structured_message():
    request = _similar_request(product_id="P1", filters=[any_of("color", "Black", "Navy"), none_of("brand", "Acme")],
                               exclude_products=["P7"], score_threshold=0.5)
    assert [(c.key, list(c.any_of), list(c.none_of)) for c in request.filter.clauses] == [
        ("color", ["Black", "Navy"], []), ("brand", [], ["Acme"])]
    assert list(request.filter.exclude_product_ids) == ["P7"] and request.score_threshold == 0.5
    mapping = _similar_request(product_id="P1", filters={"color": "Black", "country": ["US", "GB"]})
    assert [(c.key, list(c.any_of)) for c in mapping.filter.clauses] == [("color", ["Black"]),
                                                                          ("country", ["US", "GB"])]
    assert not _similar_request(product_id="P1").HasField("score_threshold")


def test_ranges_become_range_clauses_with_only_the_bounds_given():
    request = _similar_request(product_id="P1", filters=[in_range("item_weight_pounds", gt=1, lte=2.5),
                                                         any_of("color", "Black")])
    weight, color = request.filter.clauses
    assert weight.key == "item_weight_pounds" and weight.HasField("range") and not color.HasField("range")
    assert [weight.range.HasField(b) for b in ("gt", "gte", "lt", "lte")] == [True, False, False, True]
    assert (weight.range.gt, weight.range.lte) == (1.0, 2.5)


@pytest.mark.parametrize(("text", "clause"), [
    ("item_weight_pounds<2.5", in_range("item_weight_pounds", lt=2.5)),
    ("model_year>=2019", in_range("model_year", gte=2019)),
    ("model_year>2019", in_range("model_year", gt=2019)),
    ("item_width_inches<=-1e1", in_range("item_width_inches", lte=-10)),
    ("color=Black,Navy", any_of("color", "Black", "Navy")),
    ("brand!=Acme", none_of("brand", "Acme")),
    ("size=<5", any_of("size", "<5")),  # the first operator after the key is the clause's
])
def test_the_cli_reads_every_operator(text, clause):
    assert _clause(text) == clause


@pytest.mark.parametrize("text", ["model_year>=soon", "weight<nan", "<2", "weight~2", "color="])
def test_the_cli_refuses_clauses_it_cannot_read(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        _clause(text)


def test_info_lists_keys_with_kinds_and_ranges():
    text = _info_text({"version": "v1", "attribute_keys": ["brand", "model_year"], "attributes": [
        {"key": "brand", "kind": "string", "product_count": 9},
        {"key": "model_year", "kind": "number", "product_count": 7, "min": 2014.0, "max": 2022.0}]})
    assert "brand (string, 9 products)" in text and "model_year (number 2014..2022, 7 products)" in text


def test_recommend_examples_are_products_images_ids_or_vectors(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "x.png")
    request = _recommend_request(["P1", ImageId("img-1"), tmp_path / "x.png", [0.5, 0.5]], "P9", "best_score", 5,
                                 (), (), None, True, 2, True, 0)
    kinds = [e.WhichOneof("example") for e in request.positive]
    assert kinds == ["product_id", "image_id", "image", "vector"]
    assert request.positive[1].image_id == "img-1" and list(request.positive[3].vector.values) == [0.5, 0.5]
    assert [e.product_id for e in request.negative] == ["P9"]
    assert request.strategy == pb.RECOMMEND_STRATEGY_BEST_SCORE and request.k == 5 and request.ignore_missing


def test_filter_and_recommend_misuse_fails_fast():
    client = ImageSimilarityClient("127.0.0.1:1")
    with pytest.raises(ValueError, match="needs any_of or none_of"):
        client.find_similar(product_id="P1", filters=[any_of("color")])
    with pytest.raises(ValueError, match="the range on 'weight' needs gt, gte, lt or lte"):
        client.find_similar(product_id="P1", filters=[in_range("weight")])
    with pytest.raises(ValueError, match="none of them NaN"):
        client.find_similar(product_id="P1", filters=[in_range("weight", lt=float("nan"))])
    with pytest.raises(ValueError, match="one of them"):
        client.find_similar(product_id="P1", filters=[Clause("weight", any_of=("1",), range=Range(lt=2))])
    with pytest.raises(TypeError, match="any_of"):
        client.find_similar(product_id="P1", filters=["color=Black"])
    with pytest.raises(ValueError, match="score_threshold"):
        client.find_similar(product_id="P1", score_threshold=2)
    with pytest.raises(ValueError, match="at least one"):
        client.recommend()
    with pytest.raises(ValueError, match="strategy"):
        client.recommend(["P1"], strategy="sum")
    with pytest.raises(ValueError, match=r"score_threshold must be in -2..2"):
        client.recommend(["P1"], ["P2"], strategy="sum_scores", score_threshold=2.5)
    client.close()


def test_diversity_and_candidates_are_sent_when_given_and_checked_first():
    assert not _similar_request(product_id="P1").HasField("diversity")
    request = _similar_request(product_id="P1", diversity=0.3, candidates=40)
    assert request.HasField("diversity") and request.diversity == pytest.approx(0.3) and request.candidates == 40
    recommend = _recommend_request(["P1"], (), "average_vector", 5, (), (), None, False, 0, False, 0, 0.6, 0)
    assert recommend.diversity == pytest.approx(0.6) and recommend.candidates == 0
    with pytest.raises(ValueError, match="diversity must be in 0..1"):
        _similar_request(product_id="P1", diversity=1.5)
    with pytest.raises(ValueError, match="candidates must be a non-negative integer"):
        _similar_request(product_id="P1", diversity=0.5, candidates=-1)


def test_sum_scores_thresholds_span_the_examples():
    request = _recommend_request(["P1", "P2"], "P9", "sum_scores", 5, (), (), 2.5, False, 0, False, 0)
    assert request.strategy == pb.RECOMMEND_STRATEGY_SUM_SCORES and request.score_threshold == 2.5


def test_load_config_always_ends_and_mix_is_checked(tmp_path):
    with pytest.raises(ValueError, match="ends by itself"):
        LoadConfig("127.0.0.1:1", tmp_path, duration_s=None, requests=None)
    with pytest.raises(ValueError, match="unknown operations"):
        LoadConfig("127.0.0.1:1", tmp_path, mix={"delete": 1})
    assert parse_mix("embed=1,id=3") == {"embed": 1.0, "id": 3.0}


def test_exclude_query_is_left_unset_unless_asked():
    """Unset, the server decides (own product out for id queries, kept for photos), as in every client."""
    for query in ({"product_id": "P1"}, {"image_id": "I1"}, {"vector": [0.5, 0.5]}, {"image": b"x"}):
        assert not _similar_request(**query).HasField("exclude_query")
        for asked in (True, False):
            request = _similar_request(**query, exclude_query=asked)
            assert request.HasField("exclude_query") and request.exclude_query is asked


def test_the_packaged_service_config_is_the_one_in_protos():
    """`make protos` copies the one source into the package; the retry policy is what every client loads."""
    repo = Path(__file__).resolve().parents[2]
    source = repo / "protos" / "lookalike" / "v1" / "service_config.json"
    assert (repo / "lookalike" / "v1" / "service_config.json").read_bytes() == source.read_bytes()
    config = json.loads(SERVICE_CONFIG)
    assert config == json.loads(source.read_text())
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "lookalike.v1.ImageSimilarity"}]
    # Every method reads: a call a draining server refuses (UNAVAILABLE) or a worker's shutdown cuts (CANCELLED)
    # is asked again.
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]


def test_query_expansion_is_sent_when_given_and_checked_first():
    from client.cli import _query_expansion

    assert not _similar_request(vector=[1.0, 0.0]).HasField("query_expansion")
    assert not _similar_request(vector=[1.0, 0.0], query_expansion=False).HasField("query_expansion")
    defaults = _similar_request(vector=[1.0, 0.0], query_expansion=True)
    assert defaults.HasField("query_expansion") and not defaults.query_expansion.HasField("alpha")
    assert defaults.query_expansion.results == 0
    both = _similar_request(vector=[1.0, 0.0], query_expansion=(2, 7)).query_expansion
    assert both.HasField("alpha") and both.alpha == 2 and both.results == 7
    assert _similar_request(vector=[1.0], query_expansion=0).query_expansion.HasField("alpha")  # alpha 0 is set
    with pytest.raises(ValueError, match="image or vector query only"):
        _similar_request(product_id="P1", query_expansion=True)
    with pytest.raises(ValueError, match="an alpha >= 0"):
        _similar_request(vector=[1.0], query_expansion=-1)
    with pytest.raises(ValueError, match="an alpha >= 0"):
        _similar_request(vector=[1.0], query_expansion="3")
    with pytest.raises(ValueError, match="results must be a non-negative integer"):
        _similar_request(vector=[1.0], query_expansion=(3, 2.5))
    assert _query_expansion("3") == (3.0, None) and _query_expansion("3,10") == (3.0, 10)
    assert _query_expansion(",10") == (None, 10) and _query_expansion("default") is True
    for text in ("x", "3,y", "1,2,3"):
        with pytest.raises(Exception, match="ALPHA"):
            _query_expansion(text)
