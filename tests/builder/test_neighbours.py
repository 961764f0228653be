"""Neighbour lists: the kernel against brute force (with ties and padding), the file contract, Spark, reindex."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builder.cli import main
from builder.neighbours import product_runs
from lookalike import artifacts
from lookalike.artifacts import VECTORS_FILE, ArtifactError
from lookalike.neighbours import (
    ARRAY_FIELDS,
    DEFAULT_N,
    NEIGHBOURS_DIR,
    NeighbourLists,
    check_products,
    exact_top_products,
    file_path,
    load_neighbours,
    product_query_vectors,
)
from tests import helpers


def tie_catalogue(products: int, seed: int = 7, dimension: int = 8):
    """Products of 1 to 4 rows whose vectors have at most two non-zero components, each a power of two:
    every dot product with any query is then the same float32 whatever the summation order, so scores
    tie exactly (many do: few distinct vectors) and brute force must agree bit for bit."""
    rng = np.random.default_rng(seed)
    image_count = rng.integers(1, 5, products)
    first_row = np.concatenate([[0], np.cumsum(image_count)[:-1]])
    vectors = np.zeros((int(image_count.sum()), dimension), np.float32)
    for row in vectors:
        row[rng.choice(dimension, 2, replace=False)] = rng.choice([1.0, -1.0, 0.5, -0.5, 0.25], 2)
    return vectors, first_row, image_count


def brute_force(queries, vectors, first_row, image_count, n):
    """The definition, one query and one product at a time: best row's score, lowest row on a tie;
    score descending, then product row ascending; -1/-1/-inf padding."""
    shape = (len(queries), n)
    products, rows, scores = np.full(shape, -1), np.full(shape, -1), np.full(shape, -np.inf, np.float32)
    for q, query in enumerate(queries):
        entries = []
        for product, (start, count) in enumerate(zip(first_row, image_count, strict=True)):
            row_scores = [np.float32(np.dot(vectors[row], query)) for row in range(start, start + count)]
            best = max(row_scores)
            entries.append((-best, product, start + row_scores.index(best)))
        for rank, (negative, product, row) in enumerate(sorted(entries)[:n]):
            products[q, rank], rows[q, rank], scores[q, rank] = product, row, -negative
    return products, rows, scores


def assert_lists_equal(found, expected):
    for got, want, name in zip(found, expected, ("products", "rows", "scores"), strict=True):
        assert np.array_equal(got, want), f"{name} differ in {int((got != want).any(axis=1).sum())} lists"


@pytest.mark.parametrize("n", [1, 5, 60])
@pytest.mark.parametrize("kind", ["product", "image"])
def test_lists_equal_brute_force_with_ties(kind, n):
    vectors, first_row, image_count = tie_catalogue(120)
    queries = product_query_vectors(vectors, first_row, image_count) if kind == "product" else vectors
    # Small blocks: queries and rows cross block boundaries, and the bound prunes (120 products > n).
    found = exact_top_products(queries, vectors, first_row, image_count, n, block_queries=7, block_rows=33)
    expected = brute_force(queries, vectors, first_row, image_count, n)
    assert_lists_equal(found, expected)
    scores = found[2]
    assert (np.diff(scores, axis=1) <= 0).all(), "scores must not increase along a list"
    if n > 1:
        assert (np.diff(scores, axis=1) == 0).any(axis=1).mean() > 0.5, "most lists are meant to hold exact ties"


def test_a_product_lists_itself_first_and_shared_images_tie():
    # Product 1 and 2 share an image (the same vector twice); product 0 is alone.
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.6, 0.8]], np.float32)
    first_row, image_count = np.array([0, 1, 3]), np.array([1, 2, 1])
    products, rows, scores = exact_top_products(vectors, vectors, first_row, image_count, 3)
    # Image row 2 (product 1) and row 3 (product 2) score the same for each other: product row breaks the tie.
    assert products[2].tolist() == [1, 2, 0] and rows[2].tolist() == [2, 3, 0]
    assert products[3].tolist() == [1, 2, 0] and scores[3][0] == scores[3][1]


def test_fewer_products_than_n_are_padded():
    vectors, first_row, image_count = tie_catalogue(6, seed=3)
    queries = product_query_vectors(vectors, first_row, image_count)
    products, rows, scores = exact_top_products(queries, vectors, first_row, image_count, 10)
    assert products.shape == (6, 10) and products.dtype == np.int32 and scores.dtype == np.float32
    assert (products[:, 6:] == -1).all() and (rows[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert sorted(products[0, :6].tolist()) == list(range(6))
    assert_lists_equal((products, rows, scores), brute_force(queries, vectors, first_row, image_count, 10))


def test_random_unit_vectors_agree_with_float64_up_to_rounding():
    rng = np.random.default_rng(11)
    image_count = rng.integers(1, 5, 400)
    first_row = np.concatenate([[0], np.cumsum(image_count)[:-1]])
    vectors = rng.standard_normal((int(image_count.sum()), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = product_query_vectors(vectors, first_row, image_count)
    products, rows, scores = exact_top_products(queries, vectors, first_row, image_count, 10, block_rows=128)
    exact = (queries.astype(np.float64) @ vectors.T.astype(np.float64))
    best = np.maximum.reduceat(exact, first_row, axis=1)
    truth = np.argsort(-best, axis=1, kind="stable")[:, :10]
    assert np.array_equal(products, truth)
    assert np.allclose(scores, np.take_along_axis(best, truth, axis=1), atol=1e-6)
    # Two rows of one product can score within float32 rounding of each other: either is its best row.
    assert (np.repeat(np.arange(400), image_count)[rows] == products).all()
    assert np.allclose(np.take_along_axis(exact, rows.astype(np.int64), axis=1), scores, atol=1e-6)


def served_top(queries, vectors, first_row, image_count, n):
    """What the server's exact plan finds for each query: its scores (server.search.similarities, the served bits)
    and top_products's rule (score descending, then product row; a product's lowest row among its best)."""
    from server.search import similarities, top_products

    row_product = np.repeat(np.arange(len(first_row)), image_count)
    shape = (len(queries), n)
    products, rows, scores = np.full(shape, -1), np.full(shape, -1), np.full(shape, -np.inf, np.float32)
    for q, query in enumerate(queries):
        served = similarities(vectors, query[None, :])[:, 0]
        found, listed = top_products(served, row_product, n)
        products[q, :len(found)], rows[q, :len(found)], scores[q, :len(found)] = listed, found, served[found]
    return products, rows, scores


@pytest.mark.parametrize("kind", ["product", "image"])
def test_lists_rank_by_the_served_scores_to_the_last_bit(kind):
    """On vectors whose dot products round (not tie_catalogue's), the lists are what the server's own exact plan
    finds: the same products in the same order, the same best rows, the served scores. A product of two images
    scores both alike against its own mean, and a photo shared by two products ties them: a matrix product's
    rounding (which depends on where a query and a row sit in their blocks) must not break those ties."""
    rng = np.random.default_rng(5)
    image_count = rng.integers(1, 4, 500)
    first_row = np.concatenate([[0], np.cumsum(image_count)[:-1]])
    vectors = rng.standard_normal((int(image_count.sum()), 64)).astype(np.float32)
    for source, target in rng.integers(0, len(vectors), (len(vectors) // 5, 2)):
        vectors[target] = vectors[source]  # a photo shared by two products (or two views of one)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = product_query_vectors(vectors, first_row, image_count) if kind == "product" else vectors
    found = exact_top_products(queries, vectors, first_row, image_count, 10, block_queries=64, block_rows=256)
    assert_lists_equal(found, served_top(queries, vectors, first_row, image_count, 10))


def test_product_query_vector_is_the_servers_mean():
    vectors, first_row, image_count = tie_catalogue(30)
    queries = product_query_vectors(vectors, first_row, image_count)
    for product in (0, 7, 29):
        rows = vectors[first_row[product]:first_row[product] + image_count[product]]
        mean = rows.mean(axis=0, keepdims=True)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        assert np.array_equal(queries[product], mean[0])


@pytest.mark.parametrize(("first_row", "image_count", "rows", "message"), [
    ([0, 2, 2], [2, 0, 3], 5, "own no index row"),
    ([0, 3], [2, 2], 4, "not contiguous"),
    ([0, 2], [2, 2], 5, "not contiguous"),
])
def test_products_must_cover_the_rows(first_row, image_count, rows, message):
    with pytest.raises(ValueError, match=message):
        check_products(np.array(first_row), np.array(image_count), rows)


def write_lists(version_dir, products: int, rows: int, n: int, **wrong) -> dict:
    """A version folder with vectors and lists of the given shapes (or `wrong` arrays); returns the manifest."""
    (version_dir / NEIGHBOURS_DIR).mkdir(parents=True, exist_ok=True)
    np.save(version_dir / VECTORS_FILE, np.zeros((rows, 4), np.float32), allow_pickle=False)
    for name in ARRAY_FIELDS:
        count = products if name.startswith("product_") else rows
        array = np.zeros((count, n), np.float32 if name.endswith("_scores") else np.int32)
        np.save(version_dir / file_path(name), wrong.get(name, array), allow_pickle=False)
    return {"counts": {"products": products}, "neighbours": {"n": n, "products": products, "rows": rows}}


def test_load_neighbours_maps_the_files(tmp_path):
    manifest = write_lists(tmp_path, products=3, rows=5, n=4)
    lists = load_neighbours(tmp_path, manifest)
    assert isinstance(lists, NeighbourLists) and lists.n == 4
    assert lists.product_neighbours.shape == (3, 4) and lists.image_neighbour_scores.shape == (5, 4)
    assert isinstance(lists.image_neighbours, np.memmap)


def test_a_version_without_lists_has_none(tmp_path):
    assert load_neighbours(tmp_path, {"counts": {"products": 3}}) is None


@pytest.mark.parametrize(("name", "array", "problem"), [
    ("product_neighbours", np.zeros((3, 5), np.int32), "product_neighbours.npy is int32 [3, 5], expected int32 [3, 4]"),
    ("image_neighbours", np.zeros((4, 4), np.int32), "image_neighbours.npy is int32 [4, 4], expected int32 [5, 4]"),
    ("image_neighbour_scores", np.zeros((5, 4), np.float64), "image_neighbour_scores.npy is float64"),
    ("product_neighbour_rows", np.zeros((3, 4), np.int64), "product_neighbour_rows.npy is int64"),
])
def test_load_neighbours_refuses_wrong_shapes_and_dtypes(tmp_path, name, array, problem):
    manifest = write_lists(tmp_path, products=3, rows=5, n=4, **{name: array})
    with pytest.raises(ArtifactError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_neighbours(tmp_path, manifest)


@pytest.mark.parametrize(("name", "bad", "problem"), [
    ("product_neighbours", 3, "product_neighbours.npy names entries outside -1..2"),  # products: 3
    ("image_neighbours", -2, "image_neighbours.npy names entries outside -1..2"),
    ("product_neighbour_rows", 5, "product_neighbour_rows.npy names entries outside -1..4"),  # rows: 5
])
def test_load_neighbours_refuses_entries_outside_the_version(tmp_path, name, bad, problem):
    count = 3 if name.startswith("product_") else 5
    array = np.full((count, 4), -1, np.int32)
    array[1, 2] = bad
    manifest = write_lists(tmp_path, products=3, rows=5, n=4, **{name: array})
    with pytest.raises(ArtifactError, match=problem):
        load_neighbours(tmp_path, manifest)


def test_load_neighbours_names_a_missing_or_unreadable_file(tmp_path):
    manifest = write_lists(tmp_path, products=3, rows=5, n=4)
    (tmp_path / file_path("image_neighbour_rows")).unlink()
    with pytest.raises(ArtifactError, match="neighbours/image_neighbour_rows.npy is missing"):
        load_neighbours(tmp_path, manifest)
    np.save(tmp_path / file_path("image_neighbour_rows"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="image_neighbour_rows.npy is not a readable"):
        load_neighbours(tmp_path, manifest)


# -- reindex ----------------------------------------------------------------------------------------------------

REINDEX_WITHOUT_TENSORFLOW = """
import sys
from builder.cli import main
status = main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "reindex imported TensorFlow"
sys.exit(status)
"""


def served_lists(out: Path) -> tuple[Path, dict, NeighbourLists | None]:
    version_dir = out / artifacts.read_current(out)
    manifest = artifacts.load_manifest(version_dir, verify=True)
    return version_dir, manifest, load_neighbours(version_dir, manifest)


def reference_lists(version_dir: Path, n: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    vectors = np.load(version_dir / artifacts.VECTORS_FILE, allow_pickle=False)
    first_row, image_count = product_runs(version_dir)
    queries = product_query_vectors(vectors, first_row, image_count)
    return (exact_top_products(queries, vectors, first_row, image_count, n),
            exact_top_products(vectors, vectors, first_row, image_count, n))


def assert_lists_are_the_reference(version_dir: Path, lists: NeighbourLists) -> None:
    products, images = reference_lists(version_dir, lists.n)
    assert_lists_equal((lists.product_neighbours, lists.product_neighbour_rows, lists.product_neighbour_scores),
                       products)
    assert_lists_equal((lists.image_neighbours, lists.image_neighbour_rows, lists.image_neighbour_scores), images)
    # And against the definition in float64 on the real vectors: each listed product's score is its best
    # row's, and nothing left out scores above the last listed (both up to float32 rounding).
    vectors = np.load(version_dir / artifacts.VECTORS_FILE, allow_pickle=False).astype(np.float64)
    first_row, image_count = product_runs(version_dir)
    best = np.maximum.reduceat(vectors @ vectors.T, first_row, axis=1)
    listed = lists.image_neighbours
    assert np.allclose(np.take_along_axis(best, listed.astype(np.int64), axis=1), lists.image_neighbour_scores,
                       atol=1e-6)
    left_out = best.copy()
    np.put_along_axis(left_out, listed.astype(np.int64), -np.inf, axis=1)
    assert (left_out.max(axis=1) <= lists.image_neighbour_scores[:, -1] + 1e-6).all()


# The session's real build (the fixture) may be the first to run on a busy host.
@pytest.mark.timeout(1800)
def test_a_build_computes_lists_by_default(built):
    version_dir, manifest, lists = served_lists(built)
    assert lists is not None and lists.n == DEFAULT_N == manifest["neighbours"]["n"]
    assert manifest["neighbours"]["recall_at_10"] == 1.0
    assert "neighbours" in manifest["timings_seconds"]
    assert {file_path(name) for name in ARRAY_FIELDS} <= set(manifest["files"])
    assert (lists.product_neighbours >= 0).all(), "the catalogue has more products than a list holds"
    assert_lists_are_the_reference(version_dir, lists)


# The session's real build (the fixture) may be the first to run on a busy host.
@pytest.mark.timeout(1800)
def test_reindex_gives_a_version_without_lists_its_lists_and_changes_nothing_else(built, tmp_path):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases"))
    # A version like every one built before lists: reindex with --neighbours 0 (no Spark) drops them.
    assert main(["reindex", "--out", str(out), "--new-version", "old", "--neighbours", "0", "--nice", "0"]) == 0
    old_dir, old, no_lists = served_lists(out)
    assert old_dir.name == "old" and no_lists is None and "neighbours" not in old
    done = subprocess.run([sys.executable, "-c", REINDEX_WITHOUT_TENSORFLOW, "reindex", "--out", str(out),
                           "--version", "old", "--new-version", "listed", "--neighbours", "7", "--n-trees", "5",
                           "--nice", "0"], env=helpers.env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published listed from old" in done.stdout
    new_dir, new, lists = served_lists(out)
    assert new_dir.name == "listed" and new["reindexed_from"]["version"] == "old"
    assert lists is not None and lists.n == 7 and new["neighbours"]["recall_at_10"] == 1.0
    assert_lists_are_the_reference(new_dir, lists)
    # Everything but the index and the lists is the old version's, byte for byte.
    derived = {artifacts.INDEX_FILE} | {file_path(name) for name in ARRAY_FIELDS}
    kept = {rel: digest for rel, digest in old["files"].items() if rel not in derived}
    assert {rel: digest for rel, digest in new["files"].items() if rel not in derived} == kept
    assert set(kept) >= {artifacts.VECTORS_FILE, artifacts.IMAGES_FILE, artifacts.PRODUCTS_FILE, "model/saved_model.pb"}
    assert new["index"]["n_trees"] >= 5 and new["config"]["n_trees"] == 5
    for key in ("counts", "catalogue", "attribute_keys", "embedding", "dimension", "head"):
        assert new[key] == old[key]
    assert sorted(p.relative_to(new_dir).as_posix() for p in (new_dir / artifacts.MODEL_DIR).rglob("*")) == \
        sorted(p.relative_to(old_dir).as_posix() for p in (old_dir / artifacts.MODEL_DIR).rglob("*"))


@pytest.mark.parametrize(("arguments", "problem"), [
    (["--neighbours", "-1"], "neighbours must be between 0"),
    (["--version", "nope"], "has no version 'nope'"),
    (["--version", "../elsewhere"], "invalid version name"),
    (["--n-trees", "0"], "n_trees must be at least 1"),
])
def test_reindex_mistakes_are_one_line(tmp_path, capsys, arguments, problem):
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    artifacts.write_current(out, "v1")
    assert main(["reindex", "--out", str(out), "--nice", "0", *arguments]) == 2
    error = capsys.readouterr().err
    assert problem in error and error.count("\n") == 1 and "Traceback" not in error
    assert [p.name for p in out.iterdir()] == ["CURRENT"], "a refused reindex leaves nothing behind"


def test_reindex_without_a_served_version_or_folder(tmp_path, capsys):
    assert main(["reindex", "--out", str(tmp_path / "missing"), "--nice", "0"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["reindex", "--out", str(tmp_path), "--nice", "0"]) == 2
    assert "CURRENT does not exist" in capsys.readouterr().err


def test_blocks_computed_apart_assemble_into_the_lists(tmp_path):
    """The executors' side (block_task over spark.range ids) and the driver's (assemble), without Spark:
    uneven blocks of both kinds, written as Spark would write them, make the same lists as one call."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.neighbours import BLOCK_SCHEMA, assemble, block_task, plan_blocks

    vectors, first_row, image_count = tie_catalogue(50, seed=5)
    np.save(tmp_path / VECTORS_FILE, vectors, allow_pickle=False)
    pq.write_table(pa.table({"first_row": pa.array(first_row, pa.int32()),
                             "image_count": pa.array(image_count, pa.int32())}), tmp_path / artifacts.PRODUCTS_FILE)
    blocks = plan_blocks(len(first_row), len(vectors), task_queries=16)
    assert [b for b in blocks if b[0] == "product"][-1] == ("product", 48, 50)
    task = block_task(str(tmp_path), 9, blocks)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ids = list(range(len(blocks)))
    for part, batch in enumerate((ids[::2], ids[1::2])):
        rows = pd.concat(task(iter([pd.DataFrame({"id": batch})])), ignore_index=True)
        assert list(rows.columns) == [column.split()[0] for column in BLOCK_SCHEMA.split(", ")]
        rows.to_parquet(scratch / f"part-{part:05d}.parquet")
    assemble(scratch, tmp_path, 9, {"product": len(first_row), "image": len(vectors)})
    lists = load_neighbours(tmp_path, {"counts": {"products": len(first_row)}, "neighbours": {"n": 9}})
    queries = product_query_vectors(vectors, first_row, image_count)
    assert_lists_equal((lists.product_neighbours, lists.product_neighbour_rows, lists.product_neighbour_scores),
                       exact_top_products(queries, vectors, first_row, image_count, 9))
    assert_lists_equal((lists.image_neighbours, lists.image_neighbour_rows, lists.image_neighbour_scores),
                       brute_force(vectors, vectors, first_row, image_count, 9))
    # A block that never came back is an error, not a list of zeros.
    (scratch / "part-00001.parquet").unlink()
    with pytest.raises(RuntimeError, match="came back from no task"):
        assemble(scratch, tmp_path, 9, {"product": len(first_row), "image": len(vectors)})
