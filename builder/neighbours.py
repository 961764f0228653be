"""Neighbour lists on Spark: every product's and every index row's exact top-N products, a block per task."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lookalike import artifacts
from lookalike.neighbours import (
    METHOD,
    NEIGHBOURS_DIR,
    check_products,
    exact_top_products,
    expected_dtype,
    file_path,
    product_query_vectors,
)

log = logging.getLogger(__name__)

KINDS = ("product", "image")
# Queries per Spark task: about 10 s of one core at ABO's size, so tasks spread evenly over executors
# and a lost one costs little; a task's own memory is the kernel's blocks, not the catalogue.
TASK_QUERIES = 4096
# Each task returns its block as raw little-endian bytes (no pickle) in one row of this schema.
BLOCK_SCHEMA = "kind string, start long, products binary, rows binary, scores binary"
# The executors' results, written beside the lists and removed once they are assembled.
SCRATCH_DIR = ".neighbour-blocks"
# Queries of each kind checked against a dense brute-force scan for the manifest's recall@10.
RECALL_QUERIES = 100
# One BLAS thread per Spark task: local[*] already runs a task on every core.
SPARK_CONF = {"spark.executorEnv.OPENBLAS_NUM_THREADS": "1", "spark.executorEnv.OMP_NUM_THREADS": "1",
              "spark.executorEnv.MKL_NUM_THREADS": "1"}


def build_lists(version_dir: Path, n: int, spark_master: str, extra_spark_conf: dict | None = None) -> dict:
    """Computes the lists of a (staging) version folder holding vectors.npy and products.parquet on a
    Spark session of its own; returns the manifest's neighbours section."""
    from builder.build import spark_session

    spark = spark_session(spark_master, {**SPARK_CONF, **(extra_spark_conf or {})})
    try:
        return compute_lists(spark, version_dir, n)
    finally:
        spark.stop()


def compute_lists(spark, version_dir: Path, n: int, task_queries: int = TASK_QUERIES) -> dict:
    """Scores every query block in the executors, assembles the blocks into neighbours/*.npy.

    Executors read the folder's vectors.npy (memory-mapped: tasks on one host share its pages) and
    products.parquet by path, so on a cluster the folder must be on storage every node sees, as --out
    already must be; nothing as large as the vectors travels through Spark.
    """
    begin = time.perf_counter()
    version_dir = version_dir.resolve()
    first_row, image_count = product_runs(version_dir)
    rows = len(np.load(version_dir / artifacts.VECTORS_FILE, mmap_mode="r", allow_pickle=False))
    check_products(first_row, image_count, rows)
    blocks = plan_blocks(len(first_row), rows, task_queries)
    scratch = version_dir / SCRATCH_DIR
    log.info("neighbour lists: %d products and %d image rows, top %d, in %d tasks", len(first_row), rows, n,
             len(blocks))
    (spark.range(0, len(blocks), 1, numPartitions=len(blocks))
     .mapInPandas(block_task(str(version_dir), n, blocks), BLOCK_SCHEMA)
     .write.parquet(str(scratch)))
    counts = {"product": len(first_row), "image": rows}
    assemble(scratch, version_dir, n, counts)
    shutil.rmtree(scratch)
    recall = measure_recall(version_dir, n)
    return {"n": n, "products": len(first_row), "rows": rows, "method": METHOD, "recall_at_10": recall,
            "recall_queries": RECALL_QUERIES * len(KINDS), "block_queries": task_queries, "tasks": len(blocks),
            "seconds": round(time.perf_counter() - begin, 3)}


def product_runs(version_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each product's first index row and image count, in product row order."""
    table = pq.read_table(version_dir / artifacts.PRODUCTS_FILE, columns=["first_row", "image_count"])
    return (table.column("first_row").to_numpy().astype(np.int64),
            table.column("image_count").to_numpy().astype(np.int64))


def plan_blocks(products: int, rows: int, task_queries: int) -> list[tuple[str, int, int]]:
    """(kind, start, stop) of every task: product queries, then image row queries."""
    return [(kind, start, min(start + task_queries, count))
            for kind, count in zip(KINDS, (products, rows), strict=True)
            for start in range(0, count, task_queries)]


def block_lists(version_dir: Path, kind: str, start: int, stop: int, n: int) -> tuple[np.ndarray, ...]:
    """One task's work: the lists of queries start..stop-1 of one kind, against every index row."""
    vectors = np.load(version_dir / artifacts.VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    first_row, image_count = product_runs(version_dir)
    if kind == "product":
        queries = product_query_vectors(vectors, first_row[start:stop], image_count[start:stop])
    else:
        queries = np.asarray(vectors[start:stop], np.float32)
    return exact_top_products(queries, vectors, first_row, image_count, n)


def block_task(version_dir: str, n: int, blocks: list[tuple[str, int, int]]):
    """The mapInPandas function: block ids (spark.range's `id`) in, one row per block out."""

    def lists_of_blocks(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block in batch["id"]:
                kind, start, stop = blocks[int(block)]
                products, rows, scores = block_lists(Path(version_dir), kind, start, stop, n)
                yield pd.DataFrame({"kind": [kind], "start": [start], "products": [_bytes(products)],
                                    "rows": [_bytes(rows)], "scores": [_bytes(scores)]})

    return lists_of_blocks


def _bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def assemble(scratch: Path, version_dir: Path, n: int, counts: dict[str, int]) -> None:
    """Copies the executors' blocks into the version's memory-mappable .npy files, checking every query
    was answered once."""
    (version_dir / NEIGHBOURS_DIR).mkdir(exist_ok=True)
    outputs = {}
    for kind in KINDS:
        for part in ("neighbours", "neighbour_rows", "neighbour_scores"):
            name = f"{kind}_{part}"
            outputs[kind, part] = np.lib.format.open_memmap(version_dir / file_path(name), mode="w+",
                                                            dtype=expected_dtype(name), shape=(counts[kind], n))
    filled = {kind: np.zeros(counts[kind], bool) for kind in KINDS}
    for path in sorted(scratch.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8):
            for block in batch.to_pylist():
                kind, start = block["kind"], block["start"]
                for part, column in (("neighbours", "products"), ("neighbour_rows", "rows"),
                                     ("neighbour_scores", "scores")):
                    target = outputs[kind, part]
                    values = np.frombuffer(block[column], target.dtype.newbyteorder("<")).reshape(-1, n)
                    target[start:start + len(values)] = values
                filled[kind][start:start + len(values)] = True
    for kind in KINDS:
        if not filled[kind].all():
            raise RuntimeError(f"neighbour lists: {int((~filled[kind]).sum())} {kind} queries came back from no task")
    for array in outputs.values():
        array.flush()


def measure_recall(version_dir: Path, n: int, queries: int = RECALL_QUERIES, seed: int = 42) -> float:
    """recall@10 of the written lists against a dense brute-force scan on a sample of product and image
    queries: 1.0 when the lists are exact (up to float32 rounding of near-equal scores)."""
    from lookalike.neighbours import load_neighbours

    vectors = np.load(version_dir / artifacts.VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    first_row, image_count = product_runs(version_dir)
    manifest = {"counts": {"products": len(first_row)}, "neighbours": {"n": n}}
    lists = load_neighbours(version_dir, manifest)
    rng = np.random.default_rng(seed)
    k = min(10, n, len(first_row))
    hits = total = 0
    for kind, listed in (("product", lists.product_neighbours), ("image", lists.image_neighbours)):
        picked = np.sort(rng.choice(len(listed), size=min(queries, len(listed)), replace=False))
        if kind == "product":
            query_vectors = product_query_vectors(vectors, first_row[picked], image_count[picked])
        else:
            query_vectors = np.asarray(vectors[picked], np.float32)
        truth = dense_top_products(query_vectors, vectors, first_row, k)
        for found, expected in zip(listed[picked, :k], truth, strict=True):
            hits += len(set(found.tolist()) & set(expected.tolist()))
            total += k
    return round(hits / total, 6) if total else 1.0


def dense_top_products(queries: np.ndarray, vectors: np.ndarray, first_row: np.ndarray, k: int,
                       block_queries: int = 16) -> np.ndarray:
    """The top-k product rows of each query by a full scan: every row scored, each product's maximum by
    reduceat, product row ascending on a tie. The reference the lists are measured against."""
    out = []
    for start in range(0, len(queries), block_queries):
        scores = queries[start:start + block_queries] @ np.asarray(vectors, np.float32).T
        best = np.maximum.reduceat(scores, first_row, axis=1)
        out.append(np.argsort(-best, axis=1, kind="stable")[:, :k])
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)
