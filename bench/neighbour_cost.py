"""What the builder's exact neighbour lists cost: Spark runs on clustered synthetic catalogues, and the
kernel's per-query time at ABO's size, extrapolated to all of ABO's queries."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike import artifacts

ABO_PRODUCTS, ABO_IMAGES = 147_702, 398_212
# ABO's own mix: 576 product types of Zipf-like frequencies; a type, then a product, then its photos
# deviate from one another inside a 32-dimensional subspace of the 128 (like the ABO-shaped set).
TYPES, SUBSPACE, DIMENSION = 576, 32, 128


def clustered_catalogue(images: int, seed: int = 17) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit vectors [R, 128], first_row, image_count) with ABO's 2.7 images per product (1 to 5)."""
    rng = np.random.default_rng(seed)
    products = max(1, round(images * ABO_PRODUCTS / ABO_IMAGES))
    image_count = rng.integers(1, 5, products)
    image_count[rng.random(products) < 0.5] += 1
    image_count = np.maximum(1, np.round(image_count * images / image_count.sum())).astype(np.int64)
    image_count[-1] += images - image_count.sum()
    while image_count[-1] < 1:  # bounded: each pass moves one image to the last product
        donor = int(np.argmax(image_count))
        image_count[donor] -= 1
        image_count[-1] += 1
    first_row = np.concatenate([[0], np.cumsum(image_count)[:-1]])
    frequency = 1 / np.arange(1, TYPES + 1)
    product_type = rng.choice(TYPES, products, p=frequency / frequency.sum())
    basis = rng.standard_normal((SUBSPACE, DIMENSION)).astype(np.float32)
    types = rng.standard_normal((TYPES, SUBSPACE)).astype(np.float32)
    product_centres = types[product_type] + 0.6 * rng.standard_normal((products, SUBSPACE)).astype(np.float32)
    points = (np.repeat(product_centres, image_count, axis=0)
              + 0.3 * rng.standard_normal((images, SUBSPACE)).astype(np.float32))
    vectors = points @ basis + 0.05 * rng.standard_normal((images, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, first_row, image_count


def write_folder(folder: Path, vectors: np.ndarray, first_row: np.ndarray, image_count: np.ndarray) -> None:
    """What the lists read from a staging folder: vectors.npy and products.parquet's runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    np.save(folder / artifacts.VECTORS_FILE, vectors, allow_pickle=False)
    pq.write_table(pa.table({"first_row": pa.array(first_row, pa.int32()),
                             "image_count": pa.array(image_count, pa.int32())}), folder / artifacts.PRODUCTS_FILE)


def spark_run(images: int, n: int, spark_master: str) -> dict:
    """The builder's own Spark stage on a synthetic catalogue: wall time, tasks and recall@10."""
    from builder.neighbours import build_lists

    vectors, first_row, image_count = clustered_catalogue(images)
    with tempfile.TemporaryDirectory(prefix="neighbour-cost-") as folder:
        write_folder(Path(folder), vectors, first_row, image_count)
        begin = time.perf_counter()
        section = build_lists(Path(folder), n, spark_master)
        wall = time.perf_counter() - begin
        list_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*.npy")) - vectors.nbytes - 128
    return {"images": images, "products": len(first_row), "n": n, "wall_seconds": round(wall, 1),
            "lists_seconds": section["seconds"], "tasks": section["tasks"],
            "recall_at_10": section["recall_at_10"], "list_bytes": int(list_bytes)}


def kernel_at_abo(n: int, queries: int) -> dict:
    """One core's seconds per query of the kernel against ABO's number of rows, and the whole of ABO's
    lists (a query per product and per image) extrapolated from it for 1 and 2 cores."""
    from lookalike.neighbours import exact_top_products, product_query_vectors

    vectors, first_row, image_count = clustered_catalogue(ABO_IMAGES)
    rng = np.random.default_rng(3)
    products = np.sort(rng.choice(len(first_row), queries // 2, replace=False))
    image_rows = np.sort(rng.choice(len(vectors), queries - len(products), replace=False))
    picked = np.concatenate([product_query_vectors(vectors, first_row[products], image_count[products]),
                             vectors[image_rows]])
    begin = time.process_time()
    exact_top_products(picked, vectors, first_row, image_count, n)
    per_query = (time.process_time() - begin) / len(picked)
    total = per_query * (len(first_row) + len(vectors))
    matmul_flop = 2.0 * (len(first_row) + len(vectors)) * len(vectors) * DIMENSION
    return {"rows": len(vectors), "products": len(first_row), "queries_timed": len(picked),
            "cpu_ms_per_query": round(per_query * 1000, 3), "abo_cpu_hours": round(total / 3600, 3),
            "abo_hours_on_2_cores": round(total / 7200, 3), "abo_matmul_tflop": round(matmul_flop / 1e12, 1),
            "abo_list_bytes": 3 * 4 * n * (len(first_row) + len(vectors))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, nargs="*", default=[50_000, 100_000],
                        help="synthetic catalogue sizes (index rows) to run on Spark")
    parser.add_argument("--neighbours", type=int, default=100)
    parser.add_argument("--abo-queries", type=int, default=2048, help="queries timed against ABO's size (0: skip)")
    parser.add_argument("--spark-master", default="local[*]")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    report = {"spark": [spark_run(images, args.neighbours, args.spark_master) for images in args.images]}
    if args.abo_queries:
        report["kernel_at_abo"] = kernel_at_abo(args.neighbours, args.abo_queries)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
