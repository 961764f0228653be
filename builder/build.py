"""The build: scan and filter on Spark, embed in executors, fit the head, index, publish a version."""

from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from builder import __version__
from builder.augment import augment, check_augment_neighbours
from builder.backbones import SPECS
from builder.cache import DEFAULT_CACHE, FeatureCache, model_identity, model_key, new_tmp, publish, shard_name
from builder.catalogue import (
    PRODUCTS_CSV,
    Catalogue,
    assemble,
    check_language,
    listings_files,
    no_membership,
    read_listings,
    read_products_csv,
)
from builder.index import ANNOY, INDEX_KINDS, METRIC, build_index
from builder.model import (
    AUTO_HEAD,
    DEFAULT_TYPE_WEIGHT,
    HEADS,
    POOLINGS,
    SUPERVISED_HEADS,
    Head,
    LabelError,
    build_trunk,
    export,
    fit_head,
    l2_normalise,
    save_head,
)
from builder.sample import LABELS_FILE
from lookalike import artifacts, tables
from lookalike.neighbours import DEFAULT_N, check_neighbours
from lookalike.neighbours import MANIFEST_KEY as NEIGHBOURS_KEY
from lookalike.preprocess import INPUT_SIZE, PREPROCESSINGS, TOO_LARGE

log = logging.getLogger(__name__)
# The catalogue root's folder of image files (ABO's small/): paths in the tables are relative to it.
IMAGE_FOLDER = "small"
IMAGE_GLOB = "*.{jpg,jpeg,png,webp,gif,bmp,tif,tiff,JPG,JPEG,PNG,WEBP,GIF,BMP,TIF,TIFF}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; each field is a command-line flag of `lookalike-build build`."""

    images: Path
    out: Path
    # ABO listings folder; by default <images>/listings/metadata or <images>/../listings/metadata.
    listings: Path | None = None
    # A non-ABO catalogue's product_id,image_id[,role],attributes... file; by default <images>/products.csv.
    products_csv: Path | None = None
    # Attributes are kept in this language, else the same language elsewhere (en_GB), else any.
    language: str = "en_US"
    # Any Spark master URL; local[*] uses every core of this machine.
    spark_master: str = "local[*]"
    # The seed's filter: |width - height| >= this drops an image (banners, text labels).
    max_aspect_difference: int = 200
    # efficientnet_lite0 + plain + pca measured best of the 128-d configurations (BENCHMARKS.md).
    backbone: str = "efficientnet_lite0"
    # "plain" only resizes (keeps colour); "clahe-grey" is the seed's, measured worse on every backbone.
    preprocessing: str = "plain"
    # "pca" fits 128 axes on the catalogue's own features; "lda" learns them from the catalogue's
    # product types (label_key); "metric" trains them on the product types with a proxy loss, stopped on
    # a held-out share of the catalogue; "random-conv" is the seed's untrained head. "auto": with product
    # types, lda (measured 5 points of precision@10 above pca, BENCHMARKS.md), or metric when it beats lda
    # on the held-out share by more than the figure's standard error; else pca.
    head: str = AUTO_HEAD
    dimension: int = 128
    # How the backbone's last feature map becomes one feature vector: "avg" or "gem" (p = 3). GeM was
    # 0.7 point of precision@10 better on grey Fashion-MNIST, 0.8 worse on colour clip art, and costs a
    # tenth of the model's speed (BENCHMARKS.md), so average pooling stays the default.
    pooling: str = "avg"
    # Features of the image and its left-right mirror, averaged (twice the model work).
    mirror: bool = False
    # The product attribute a supervised head learns from, and the share of its cosine that is
    # product-type similarity (the rest is look similarity).
    label_key: str = "product_type"
    type_weight: float = DEFAULT_TYPE_WEIGHT
    # "annoy" (mapped, shared by every worker) or "hnsw" (hnswlib: several times faster per query at ABO's
    # size, but each worker holds its own copy in memory; bench/index_scale.py).
    index: str = ANNOY
    # Annoy's fewest trees: the builder tries this many, doubling up to builder.index.MAX_N_TREES, and keeps
    # the pair (trees, search_k) whose measured query reaches target_recall fastest.
    n_trees: int = 10
    # recall@10 against exact search that the chosen budget (Annoy's trees and search_k, HNSW's ef) reaches.
    target_recall: float = 0.95
    # Exact top-N products of every product and image, served by lookup (0: none; queries then search).
    # About a quarter of an hour on this 2-core host at ABO's size; 4 x 3 x N bytes per product and image.
    neighbours: int = DEFAULT_N
    # Database-side augmentation: each catalogue vector is replaced, before indexing, by the
    # similarity-weighted mean of itself and its this many nearest catalogue images (exact; 0: off).
    # Photo queries stay the model's own vectors; a query by image or product id uses the stored,
    # augmented ones. Costs an exact all-pairs scan of the catalogue in the build.
    augment_neighbours: int = 0
    # Images per resumable unit of embedding work: smaller = less lost on interruption, more jobs.
    chunk_size: int = 1024
    # Images per model call inside an executor; 8 was the fastest on a 2-core CPU (BENCHMARKS.md).
    batch_size: int = 8
    # TensorFlow threads per Spark task; local[*] runs one task per core, so 1 avoids oversubscription.
    threads_per_task: int = 1
    weights_file: str | None = None
    version: str | None = None
    # Scans and features kept by content; default OUT/.features. Share one between builds and catalogues.
    feature_cache: Path | None = None
    extra_spark_conf: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in SPECS:
            raise ValueError(f"backbone must be one of {sorted(SPECS)}")
        if self.head not in (*HEADS, AUTO_HEAD):
            raise ValueError(f"head must be one of {(*HEADS, AUTO_HEAD)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        if not 0 < self.type_weight < 1:
            raise ValueError("type_weight must be between 0 and 1 (exclusive)")
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}")
        if not 0 < self.target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}")
        for name in ("n_trees", "chunk_size", "batch_size", "dimension", "max_aspect_difference"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        check_neighbours(self.neighbours)
        check_augment_neighbours(self.augment_neighbours)
        check_language(self.language)


@dataclass(frozen=True)
class BuildResult:
    version: str
    version_dir: Path
    manifest: dict


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def _spark(config: BuildConfig):
    return spark_session(config.spark_master, config.extra_spark_conf, config.batch_size * 4)


def spark_session(spark_master: str, extra_conf: dict | None = None, records_per_batch: int = 32):
    """The builder's Spark session (arrow batches of `records_per_batch` rows into Python workers)."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(spark_master).appName("lookalike-build")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(records_per_batch))
               .config("spark.python.worker.reuse", "true")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"))
               .config("spark.executorEnv.TF_CPP_MIN_LOG_LEVEL", "2")
               .config("spark.sql.shuffle.partitions", "8")
               # Product photos are small files: count each as 1 MiB so a job spreads over many tasks.
               .config("spark.sql.files.openCostInBytes", str(1 << 20)))
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _metadata_file(images: Path) -> Path | None:
    for candidate in (images / "images.csv.gz", images / "metadata" / "images.csv.gz"):
        if candidate.is_file():
            return candidate
    return None


def cache_of(config: BuildConfig) -> FeatureCache:
    return FeatureCache(config.feature_cache or config.out / DEFAULT_CACHE)


def scan_files(spark, config: BuildConfig, cache: FeatureCache) -> tuple[object, dict]:
    """Every image file with its size, sha256 and decoded width and height (or the decode error), as a
    Spark DataFrame. Only files not seen before with the same size and modification time are read and
    decoded; the rest come from the cache's scans."""
    from pyspark.sql import functions as F

    from builder.spark_jobs import SCAN_SCHEMA, scan_batches

    small = (config.images / IMAGE_FOLDER).resolve()
    if not small.is_dir():
        raise FileNotFoundError(f"{small} does not exist: --images must hold small/<2 hex>/<file> "
                                f"(the ABO layout)")
    # binaryFile reads a file's content only when the content column is asked for: a listing is cheap.
    folder = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
              .option("pathGlobFilter", IMAGE_GLOB).load(str(small)))
    listing = folder.select("path", "length", F.unix_millis("modificationTime").alias("mtime")).toPandas()
    seen = cache.read_scans()
    known = listing.merge(seen, left_on=["path", "length", "mtime"], right_on=["uri", "bytes", "mtime"],
                          how="inner")[seen.columns]
    fresh_paths = sorted(set(listing["path"]) - set(known["uri"]))
    if fresh_paths:
        # Most files new (a first build): one pass over the folder; a few: just those files.
        source = folder if len(fresh_paths) > len(listing) // 2 else spark.read.format("binaryFile").load(fresh_paths)
        fresh = (source.select("path", "length", "content", F.unix_millis("modificationTime").alias("mtime"))
                 .mapInPandas(scan_batches, SCAN_SCHEMA).toPandas())
        fresh = fresh[fresh["uri"].isin(set(fresh_paths))]
        cache.add_scans(fresh)
        known = pd.concat([known, fresh], ignore_index=True) if len(known) else fresh
    report = {"files": int(len(listing)), "decoded": len(fresh_paths),
              "from_cache": int(len(listing)) - len(fresh_paths)}
    known = known.astype({"bytes": "int64", "mtime": "int64"})
    known["file_width"] = known["file_width"].astype("Int32")
    known["file_height"] = known["file_height"].astype("Int32")
    return spark.createDataFrame(known[["uri", "bytes", "sha256", "file_width", "file_height", "error"]],
                                 schema=SCAN_SCHEMA.replace(" mtime long,", "")), report


def scan_and_filter(spark, config: BuildConfig, cache: FeatureCache) -> tuple[object, dict]:
    """Returns the dataset table (kept and dropped rows with reasons) as a Spark DataFrame, and how the
    scan went (files, decoded, from_cache)."""
    from pyspark.sql import functions as F

    small = (config.images / IMAGE_FOLDER).resolve()
    files, scan_report = scan_files(spark, config, cache)
    root_uri = small.as_uri().replace("file:///", "file:/") + "/"
    scanned = files.withColumn("path", F.expr(f"substring(uri, {len(root_uri) + 1})"))
    metadata_path = _metadata_file(config.images)
    if metadata_path is not None:
        meta = (spark.read.option("header", "true").csv(str(metadata_path))
                .select("image_id", F.col("height").cast("int").alias("meta_height"),
                        F.col("width").cast("int").alias("meta_width"), "path"))
        table = meta.join(scanned, on="path", how="full_outer")
        table = table.withColumn("image_id", F.coalesce(
            "image_id", F.regexp_extract("path", r"([^/]+)\.[^./]+$", 1)))
    else:
        table = scanned.withColumn("image_id", F.regexp_extract("path", r"([^/]+)\.[^./]+$", 1))
        table = table.withColumn("meta_width", F.lit(None).cast("int")).withColumn(
            "meta_height", F.lit(None).cast("int"))
    table = (table.withColumn("width", F.coalesce("meta_width", "file_width"))
             .withColumn("height", F.coalesce("meta_height", "file_height"))
             .withColumn("size_from", F.when(F.col("meta_width").isNotNull(), "metadata")
                         .when(F.col("file_width").isNotNull(), "file")))
    threshold = config.max_aspect_difference
    reason = (F.when(F.col("uri").isNull(), F.lit("missing: listed in images.csv.gz, no file"))
              .when(F.col("error").startswith(TOO_LARGE), F.col("error"))
              .when(F.col("error").isNotNull(), F.concat(F.lit("undecodable: "), F.col("error")))
              .when(F.abs(F.col("width") - F.col("height")) >= threshold,
                    F.format_string(f"aspect: |width - height| = %d >= {threshold}",
                                    F.abs(F.col("width") - F.col("height")))))
    labels_path = config.images / LABELS_FILE
    table = table.withColumn("drop_reason", reason).withColumn("kept", F.col("drop_reason").isNull())
    columns = ["image_id", "path", "uri", "width", "height", "size_from", "bytes", "sha256", "kept", "drop_reason"]
    table = table.select(*columns)
    if labels_path.is_file():
        labels = spark.read.option("header", "true").csv(str(labels_path)).select(
            "image_id", F.col("label").cast("int"), "label_name")
        table = table.join(labels, on="image_id", how="left")
    else:
        table = table.withColumn("label", F.lit(None).cast("int")).withColumn(
            "label_name", F.lit(None).cast("string"))
    return table.orderBy("path"), scan_report


def read_membership(spark, config: BuildConfig):
    """Which images make which product: ABO listings, else a products.csv, else every image alone."""
    files = listings_files(config.images, config.listings)
    if files:
        return read_listings(spark, files, config.language)
    products_csv = config.products_csv or config.images / PRODUCTS_CSV
    if config.products_csv is not None or products_csv.is_file():
        return read_products_csv(spark, products_csv)
    return no_membership()


def _model_key(config: BuildConfig, cache: FeatureCache) -> str:
    identity = model_identity(config.backbone, SPECS[config.backbone].source, config.weights_file,
                              config.preprocessing, config.head, config.pooling, config.mirror)
    key = model_key(identity)
    cache.register_model(key, identity)
    return key


def _trunk_model(config: BuildConfig, cache: FeatureCache, key: str):
    """The Keras trunk (for this version's model) and the trunk SavedModel the executors run: pixels -> raw
    features, exported once per model into the cache."""
    trunk_dir = cache.trunk_dir(key)
    trunk = build_trunk(config.backbone, config.head, config.weights_file, config.pooling, config.mirror)
    if not trunk_dir.exists():
        # Export beside, then rename: an interrupted export never looks finished.
        partial = new_tmp(trunk_dir.parent)
        export(trunk, partial, head=None, normalise=False)
        publish(partial, trunk_dir)
    return trunk, trunk_dir


def _distinct_labels(config: BuildConfig, attributes) -> int:
    if config.label_key not in attributes.columns:
        return 0
    values = attributes[config.label_key].dropna()
    return int(values[values != ""].nunique())


def choose_head(config: BuildConfig, attributes) -> BuildConfig:
    """Resolves the auto head without product types to pca (with them, auto stays until the head is fitted:
    lda or metric, by the held-out split); a supervised head asked for by name is refused, before any
    embedding, when the catalogue has no labels to learn from."""
    labels = _distinct_labels(config, attributes)
    if config.head == AUTO_HEAD:
        return config if labels >= 2 else replace(config, head="pca")
    if config.head not in SUPERVISED_HEADS:
        return config
    if config.label_key not in attributes.columns:
        keys = ", ".join(c for c in attributes.columns if c != "product_id") or "none"
        raise LabelError(f"head {config.head!r} learns from the product attribute {config.label_key!r}, which "
                         f"this catalogue does not have (its attributes: {keys}); choose --label-key or "
                         "an unsupervised head")
    if labels < 2:
        raise LabelError(f"head {config.head!r} needs at least two values of {config.label_key!r}; "
                         f"the catalogue has {labels}")
    return config


def fit_version_head(config: BuildConfig, features: np.ndarray, ids: list[str], catalogue) -> tuple[Head | None, dict]:
    """The head, fitted on the catalogue's own features (and its product types, for lda and metric). For
    metric and auto, head_fit says which head was chosen and the held-out figures it was chosen by."""
    if config.head not in (*SUPERVISED_HEADS, AUTO_HEAD):
        return fit_head(config.head, features, config.dimension), ({"rows": len(features)} if config.head == "pca"
                                                                  else {})
    # One row per (product, image) pair, labelled with its product's type; unlabelled rows sit out.
    position = {image_id: n for n, image_id in enumerate(ids)}
    rows = catalogue.rows
    products = catalogue.products
    labels = (products[config.label_key].to_numpy()[rows["product_row"].to_numpy()]
              if config.label_key in products.columns else np.full(len(rows), None))
    pairs = features[[position[i] for i in rows["image_id"]]]
    if config.head != "lda":
        from builder.metric import fit_supervised

        head, report = fit_supervised(config.head, pairs, labels, rows["product_id"].to_numpy(), config.dimension,
                                      config.type_weight)
        return head, {**report, "label_key": config.label_key}
    head = fit_head(config.head, pairs, config.dimension, labels, config.type_weight)
    known = [label for label in labels if isinstance(label, str) and label]
    return head, {"rows": len(known), "label_key": config.label_key, "labels": len(set(known)),
                  "type_axes": int(head.parts[0][0].matrix.shape[1]), "type_weight": config.type_weight}


def embed_on_spark(spark, config: BuildConfig, kept: list[dict], cache: FeatureCache, key: str,
                   trunk_dir: Path) -> dict:
    """Embeds, in Spark executors, the kept images whose content this model has never seen, a group of
    chunks per job; each finished job becomes a cache shard at once, so a killed build loses one job."""
    from builder.spark_jobs import EMBED_SCHEMA, make_embedder

    known = cache.known(key)
    contents = {row["sha256"]: row["uri"] for row in kept}
    todo = [(uri, sha) for sha, uri in contents.items() if sha not in known]
    chunks = [todo[i:i + config.chunk_size] for i in range(0, len(todo), config.chunk_size)]
    per_job = max(1, spark.sparkContext.defaultParallelism)
    shards = cache.shards_dir(key)
    with tqdm(total=len(todo), desc="embedding", unit="img") as progress:
        for first in range(0, len(chunks), per_job):
            group = [pair for chunk in chunks[first:first + per_job] for pair in chunk]
            ids = dict(group)
            embed = make_embedder(str(trunk_dir), config.preprocessing, config.threads_per_task,
                                  config.batch_size, ids)
            # Spark's own binaryFile source reads the group's files; no join, no shuffle.
            files = spark.read.format("binaryFile").load(list(ids)).select("path", "content")
            tmp = new_tmp(shards)
            files.mapInPandas(embed, EMBED_SCHEMA).write.parquet(str(tmp))
            publish(tmp, shards / shard_name())
            progress.update(len(group))
    return {"model_key": key, "cache": str(cache.root), "contents": len(contents), "embedded": len(todo),
            "from_cache": len(contents) - len(todo)}


def _read_features(cache: FeatureCache, key: str, kept: list[dict]) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Features of the kept images in order (image ids without features left out) and the images whose
    content the model could not take, with why."""
    position, matrix, failed = cache.read(key, {row["sha256"] for row in kept})
    ordered = [row for row in kept if row["sha256"] in position]
    features = matrix[[position[row["sha256"]] for row in ordered]]
    errors = {row["image_id"]: failed[row["sha256"]] for row in kept if row["sha256"] in failed}
    return features, [row["image_id"] for row in ordered], errors


def _new_version() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(3).hex()}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("tensorflow-cpu", "keras", "pyspark", "annoy", "albumentations", "numpy", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run_build(config: BuildConfig) -> BuildResult:
    """Builds a new version; CURRENT moves to it only when every stage succeeded."""
    clock = Stopwatch()
    requested_head = config.head
    version, staging = open_version(config.out, config.version)
    spark = _spark(config)
    cache = cache_of(config)
    try:
        with clock.stage("scan_filter"):
            table, scan_report = scan_and_filter(spark, config, cache)
            scanned = table.toPandas()
        with clock.stage("catalogue"):
            membership = read_membership(spark, config)
        config = choose_head(config, membership.attributes)
        kept_rows = scanned[scanned["kept"]].drop_duplicates("image_id").to_dict("records")
        if len(kept_rows) < 2:
            raise ValueError(f"only {len(kept_rows)} image(s) passed the filter: nothing to index")
        key = _model_key(config, cache)
        with clock.stage("trunk_export"):
            trunk, trunk_dir = _trunk_model(config, cache, key)
        with clock.stage("embed"):
            embed_report = embed_on_spark(spark, config, kept_rows, cache, key, trunk_dir)
    finally:
        spark.stop()
    features, ids, embed_errors = _read_features(cache, key, kept_rows)
    # An image the model could not take is dropped like any other, so its product may lose it.
    failed = scanned["image_id"].isin(embed_errors)
    if failed.any():
        scanned.loc[failed, "kept"] = False
        scanned.loc[failed, "drop_reason"] = [f"embedding: {embed_errors[i]}" for i in scanned.loc[failed, "image_id"]]
    catalogue = assemble(membership, scanned.drop(columns=["uri"]))
    if len(catalogue.rows) < 2:
        raise ValueError(f"only {len(catalogue.rows)} image(s) are left to index")
    with clock.stage("head_export"):
        head, head_fit = fit_version_head(config, features, ids, catalogue)
        config = replace(config, head=head_fit.get("chosen", config.head))
        image_vectors = l2_normalise(head.apply(features) if head is not None else features)
        dimension = export(trunk, staging / artifacts.MODEL_DIR, head)
        save_head(head, staging / artifacts.HEAD_FILE)
    position = {image_id: n for n, image_id in enumerate(ids)}
    vectors = image_vectors[[position[i] for i in catalogue.rows["image_id"]]]
    if config.augment_neighbours:
        with clock.stage("augment"):
            vectors = augment(vectors, config.augment_neighbours)
    with clock.stage("index"):
        index_file, report = build_index(config.index, vectors, staging, config.n_trees, config.target_recall)
    write_tables(staging, catalogue, vectors)
    neighbours = neighbour_stage(clock, staging, config.neighbours, config.spark_master, config.extra_spark_conf)
    dropped = scanned[~scanned["kept"]]
    root = config.images.resolve()
    embed_report["cache"] = _relative(cache.root, root)
    manifest = {
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": __version__,
        "libraries": library_versions(),
        # The one absolute path of the build host; every other path is relative to it, and the tables'
        # image paths are relative to its image folder (what ImageMatch.path carries).
        "catalogue_root": str(root),
        "image_folder": IMAGE_FOLDER,
        "spark_master": config.spark_master,
        "backbone": config.backbone,
        "backbone_weights": SPECS[config.backbone].source,
        "preprocessing": config.preprocessing,
        "input_size": INPUT_SIZE,
        "head": config.head,
        "head_requested": requested_head,
        "head_fit": head_fit,
        "pooling": config.pooling,
        "mirror": config.mirror,
        "dimension": dimension,
        # The stored vectors are the model's unless this names a database-side augmentation.
        "augmentation": ({"kind": "database-side", "neighbours": config.augment_neighbours,
                          "weights": "cosine (negative as 0), the image itself 1", "renormalised": True,
                          "exact": True} if config.augment_neighbours else None),
        "metric": METRIC,
        "filter": {"max_aspect_difference": config.max_aspect_difference},
        "counts": {"scanned": int(len(scanned)), "kept": int(len(kept_rows)), "dropped": int(len(dropped)),
                   "embedding_failed": len(embed_errors), "indexed": len(catalogue.rows),
                   "images_indexed": len(catalogue.rows), "products": len(catalogue.products),
                   "dropped_by_reason": _reason_counts(dropped["drop_reason"])},
        "catalogue": catalogue.report,
        "attribute_keys": sorted(catalogue.attribute_keys),
        # Float64 columns of products.parquet: number attributes, filtered by range.
        "number_keys": sorted(catalogue.number_keys),
        "embedding_failures": embed_errors,
        "embedding": embed_report,
        "scan": scan_report,
        "index": report.manifest(index_file),
        "config": _recorded_config(config, root),
        "timings_seconds": clock.seconds,
    }
    if neighbours:
        manifest[NEIGHBOURS_KEY] = neighbours
    absorbed = _deltas_absorbed(config.out, set(catalogue.products["product_id"]))
    if absorbed:
        manifest["deltas_of_previous_version"] = absorbed
    final = publish_version(config.out, version, staging, manifest)
    log.info("published %s: %d products, %d images, recall@10 %.3f", version, len(catalogue.products),
             len(catalogue.rows), report.recall_at_10)
    return BuildResult(version, final, manifest)


def _deltas_absorbed(out: Path, product_ids: set[str]) -> dict | None:
    """Whether this build holds the products `add` published for the version served until now; a warning names
    those it does not (their files were not copied into the catalogue: they leave the results with that version)."""
    from builder.add import products_not_absorbed

    report = products_not_absorbed(out, product_ids)
    missing = report["not_in_this_build"] if report else None
    if missing and missing["count"]:
        log.warning("%d of the %d products added by deltas of %s are not in this build (e.g. %s): copy their files "
                    "into the catalogue, or add them again once this version is served", missing["count"],
                    report["products"], report["of_version"], ", ".join(missing["examples"][:3]))
    return report


def open_version(out: Path, version: str | None) -> tuple[str, Path]:
    """A new version's name (given, or the time and a random suffix) and its staging folder, created."""
    out.mkdir(parents=True, exist_ok=True)
    version = artifacts.check_version_name(version or _new_version())
    if (out / version).exists():
        raise FileExistsError(f"{out / version} exists already: versions are never overwritten")
    staging = out / f".staging-{version}"
    staging.mkdir()
    return version, staging


def neighbour_stage(clock: Stopwatch, staging: Path, n: int, spark_master: str, extra_spark_conf: dict) -> dict | None:
    """The version's neighbour lists, from the vectors and products already in staging (None when n is 0)."""
    if not n:
        return None
    from builder.neighbours import build_lists

    with clock.stage("neighbours"):
        return build_lists(staging, n, spark_master, extra_spark_conf)


def publish_version(out: Path, version: str, staging: Path, manifest: dict) -> Path:
    """Checksums every file of the staging folder into its manifest, renames it to the version, and only
    then points CURRENT at it: a failure before the rename leaves the served version as it was."""
    # Files TensorFlow, Annoy and pyarrow wrote, readable by a server running as another user, on disk
    # before CURRENT can name them.
    artifacts.settle_folder(staging)
    manifest["files"] = artifacts.checksums(staging)
    artifacts.write_json_atomic(staging / artifacts.MANIFEST, manifest)
    final = out / version
    os.rename(staging, final)
    artifacts.write_current(out, version)
    return final


def write_tables(staging: Path, catalogue: Catalogue, vectors: np.ndarray) -> None:
    """images.parquet and vectors.npy in index row order, products.parquet, and the dataset table."""
    rows = catalogue.rows
    tables.write_table(staging / artifacts.IMAGES_FILE, {
        "row": rows["row"], "image_id": rows["image_id"], "product_row": rows["product_row"],
        "product_id": rows["product_id"], "role": rows["role"], "path": rows["path"],
        "label": [_int_or_none(v) for v in rows["label"]],
        "label_name": [_str_or_none(v) for v in rows["label_name"]], "sha256": rows["sha256"],
    }, tables.IMAGES_SCHEMA)
    products = catalogue.products
    columns = {name: products[name] for name in tables.PRODUCT_COLUMNS}
    for key in catalogue.attribute_keys:
        columns[key] = [_str_or_none(v) for v in products[key]]
    for key in catalogue.number_keys:
        columns[key] = products[key].astype(np.float64)
    tables.write_table(staging / artifacts.PRODUCTS_FILE, columns,
                       tables.products_schema(catalogue.attribute_keys, catalogue.number_keys))
    np.save(staging / artifacts.VECTORS_FILE, np.ascontiguousarray(vectors, np.float32), allow_pickle=False)
    tables.write_table(staging / artifacts.DATASET_FILE, catalogue.dataset, tables.DATASET_SCHEMA)


def _relative(path: Path | str, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), root)).as_posix()


def _recorded_config(config: BuildConfig, root: Path) -> dict:
    """The configuration as the manifest records it: paths relative to the catalogue root."""
    return {key: (_relative(value, root) if isinstance(value, Path) or (key == "weights_file" and value)
                  else value) for key, value in asdict(config).items()}


def _reason_counts(reasons) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = str(reason).split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _int_or_none(value) -> int | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def _str_or_none(value) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
