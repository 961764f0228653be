"""`lookalike-build add`: products of a folder embedded with the served version's own model, published as a delta.

No Spark and no head fitting: the folder is read in this process (the same layouts `build` reads), each image is
embedded by the version's SavedModel, and the result is one delta of the version (lookalike/deltas.py), which
servers apply within their watch interval. The images' features also go into the feature cache, so the next
build of a catalogue that holds these files embeds none of them again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from builder.build import IMAGE_FOLDER, _metadata_file, write_tables
from builder.cache import DEFAULT_CACHE, FeatureCache, new_tmp, shard_name
from builder.catalogue import (
    NUMBER_FIELDS,
    PLAIN_ATTRIBUTES,
    PRODUCTS_CSV,
    TAGGED_ATTRIBUTES,
    Membership,
    assemble,
    check_language,
    listings_files,
    membership_from_csv,
    membership_from_listings,
    no_membership,
)
from builder.sample import LABELS_FILE
from lookalike import artifacts, deltas
from lookalike.preprocess import TOO_LARGE, ImageError, PreprocessConfig, Preprocessor, decode

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class AddConfig:
    """What `add` publishes and from where."""

    out: Path
    # A folder in a layout `build` reads: small/<files> and ABO listings, a products.csv, or neither.
    images: Path
    listings: Path | None = None
    products_csv: Path | None = None
    language: str = "en_US"
    # Image rows the version's deltas may hold together (lookalike/deltas.py).
    max_delta_rows: int = deltas.DEFAULT_MAX_DELTA_ROWS
    # The feature cache the version's build used (default: the one its manifest names, else OUT/.features).
    feature_cache: Path | None = None
    batch_size: int = 16
    model_threads: int = 0

    def __post_init__(self) -> None:
        if self.max_delta_rows < 1 or self.batch_size < 1:
            raise ValueError("--max-delta-rows and the batch size must be at least 1")
        check_language(self.language)


@dataclass(frozen=True)
class AddResult:
    version: str
    sequence: int
    path: Path
    manifest: dict


def run_add(config: AddConfig) -> AddResult:
    """Embeds the folder's products with CURRENT's model and publishes them as its next delta."""
    started = time.perf_counter()
    version = artifacts.read_current(config.out)
    version_dir = config.out / version
    manifest = artifacts.load_manifest(version_dir, verify=False)
    if artifacts.IMAGES_FILE not in manifest["files"]:
        raise ValueError(f"version {version} was built before products existed: build a new version to add to")
    _verify_model(version_dir, manifest)
    small = config.images / IMAGE_FOLDER
    if not small.is_dir():
        raise FileNotFoundError(f"{small} does not exist: --images must hold small/<files> (the layout build reads)")
    membership = read_membership_locally(config)
    scanned = scan_folder(config.images, manifest["filter"]["max_aspect_difference"])
    named = set(membership.pairs["image_id"])
    if len(named):
        # A listing names its images: files of the folder that no listing names are not products to add.
        scanned = scanned[scanned["image_id"].isin(named)].reset_index(drop=True)
    kept = scanned[scanned["kept"]].drop_duplicates("image_id")
    deltas.check_room(config.out, version, len(kept), config.max_delta_rows)  # before any embedding; again at publish
    embedder = _Embedder(version_dir, manifest, config)
    vectors_of, features_of, errors = embedder.embed(kept)
    failed = scanned["image_id"].isin(errors)
    scanned.loc[failed, "kept"] = False
    scanned.loc[failed, "drop_reason"] = [f"embedding: {errors[i]}" for i in scanned.loc[failed, "image_id"]]
    catalogue = assemble(membership, scanned.drop(columns=["uri"]))
    if not len(catalogue.products):
        raise ValueError(f"no product of {config.images} has an image to add (see the dropped images above)")
    vectors = np.stack([vectors_of[image_id] for image_id in catalogue.rows["image_id"]]).astype(np.float32)
    cache_report = _cache_features(config, manifest, scanned, features_of)
    staging = deltas.staging_folder(config.out, version)
    write_tables(staging, catalogue, vectors)
    served_keys = {*manifest.get("attribute_keys", []), *manifest.get("number_keys", [])}
    replaced = _replaced(config.out, version, version_dir, list(catalogue.products["product_id"]))
    dropped = scanned[~scanned["kept"]]
    delta_manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "catalogue_root": str(config.images.resolve()),
        "image_folder": IMAGE_FOLDER,
        "model_of_version": version,
        "preprocessing": manifest["preprocessing"],
        "dimension": int(vectors.shape[1]),
        "counts": {"products": int(len(catalogue.products)), "images": int(len(catalogue.rows)),
                   "replaced_products": len(replaced), "dropped": int(len(dropped))},
        "replaced_product_ids": replaced[:100],
        "dropped": [{"image_id": i, "reason": r} for i, r in zip(dropped["image_id"], dropped["drop_reason"],
                                                                 strict=True)][:100],
        "attribute_keys": sorted(catalogue.attribute_keys),
        "number_keys": sorted(catalogue.number_keys),
        "attribute_keys_not_served": sorted({*catalogue.attribute_keys, *catalogue.number_keys} - served_keys),
        "embedding": {"embedded": len(kept) - len(errors), "failed": len(errors),
                      "model": "the cache's trunk and the version's head.npz" if embedder.from_trunk
                      else "the version's SavedModel", **cache_report},
        "seconds": round(time.perf_counter() - started, 3),
    }
    sequence, path = deltas.publish_delta(config.out, version, staging, delta_manifest, config.max_delta_rows)
    published = json.loads((path / deltas.DELTA_MANIFEST).read_text())
    log.info("published delta %d of %s: %d products, %d images (%d replaced)", sequence, version,
             len(catalogue.products), len(catalogue.rows), len(replaced))
    return AddResult(version, sequence, path, published)


def _verify_model(version_dir: Path, manifest: dict) -> None:
    for rel, digest in manifest["files"].items():
        if rel.startswith(f"{artifacts.MODEL_DIR}/") and artifacts.sha256_file(version_dir / rel) != digest:
            raise artifacts.ArtifactError(f"{version_dir / rel} does not match its manifest: not embedding with it")


def read_membership_locally(config: AddConfig) -> Membership:
    """Which images make which product, as `build` reads it (builder/catalogue.py), without Spark: a delta is a
    few thousand products at most."""
    files = listings_files(config.images, config.listings)
    if files:
        return membership_from_listings(listings_table(files, config.language), len(files), config.language)
    products_csv = config.products_csv or config.images / PRODUCTS_CSV
    if config.products_csv is not None or products_csv.is_file():
        return membership_from_csv(pd.read_csv(products_csv, dtype=str, keep_default_na=False).replace("", None),
                                   products_csv)
    return no_membership()


def listings_table(files: Iterable[Path], language: str) -> pd.DataFrame:
    """ABO listings (gzipped JSON lines) as the rows read_listings gives: one attribute per key, in `language`
    (else the same language in another country, else the first given); a line that is not JSON is malformed."""
    records = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    records.append(_listing_row(line, language))
    columns = ["product_id", "main_image_id", "other_image_id", "product_type", *PLAIN_ATTRIBUTES, "node",
               *TAGGED_ATTRIBUTES, *NUMBER_FIELDS, "malformed"]
    return pd.DataFrame(records, columns=columns)


def _listing_row(line: str, language: str) -> dict:
    try:
        listing = json.loads(line)
    except json.JSONDecodeError:
        return {"malformed": True}
    if not isinstance(listing, dict) or not _typed_as_spark_reads(listing):
        return {"malformed": True}

    def first(values, field: str):
        return values[0].get(field) if isinstance(values, list) and values and isinstance(values[0], dict) else None

    def text(value):
        return None if value is None else str(value)

    row = {"product_id": text(listing.get("item_id")), "main_image_id": text(listing.get("main_image_id")),
           "other_image_id": [text(v) for v in listing.get("other_image_id") or []] or None, "malformed": False,
           "product_type": first(listing.get("product_type"), "value"),
           "node": first(listing.get("node"), "node_name")}
    for name in PLAIN_ATTRIBUTES:
        value = listing.get(name)
        row[name] = text(value)
    for name in NUMBER_FIELDS:  # parsed by membership_from_listings from the raw JSON, as from Spark's text
        row[name] = listing.get(name)
    prefix = language.split("_")[0]
    for name in TAGGED_ATTRIBUTES:
        tagged = [v for v in listing.get(name) or [] if isinstance(v, dict)]
        chosen = ([v for v in tagged if v.get("language_tag") == language]
                  or [v for v in tagged if str(v.get("language_tag", "")).split("_")[0] == prefix] or tagged)
        row[name] = chosen[0].get("value") if chosen else None
    return row


def _typed_as_spark_reads(listing: dict) -> bool:
    """The field types read_listings' schema gives Spark: a listing with another type in one of them is malformed
    there (PERMISSIVE mode), so it is here too."""
    def is_list_of(value, kind) -> bool:
        return value is None or (isinstance(value, list) and all(v is None or isinstance(v, kind) for v in value))

    scalar = (str, int, float, bool)
    return (all(listing.get(name) is None or isinstance(listing[name], scalar)
                for name in ("item_id", "main_image_id", *PLAIN_ATTRIBUTES))
            and is_list_of(listing.get("other_image_id"), str)
            and all(is_list_of(listing.get(name), dict) for name in ("product_type", "node", *TAGGED_ATTRIBUTES)))


def scan_folder(images: Path, max_aspect_difference: int) -> pd.DataFrame:
    """The scan table `build` makes (image_id, path, uri, width, height, size_from, bytes, sha256, kept,
    drop_reason, label, label_name) for the files under images/small, decoded here, with the version's filter."""
    small = (images / IMAGE_FOLDER).resolve()
    rows = []
    for path in sorted(p for p in small.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        data = path.read_bytes()
        stat = path.stat()
        row = {"path": path.relative_to(small).as_posix(), "uri": f"file:{path}", "bytes": len(data),
               "mtime": stat.st_mtime_ns // 1_000_000, "sha256": hashlib.sha256(data).hexdigest(),
               "width": None, "height": None, "size_from": None, "error": None}
        try:
            height, width = decode(data).shape[:2]
            row.update(width=width, height=height, size_from="file")
        except ImageError as error:
            row["error"] = str(error)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["path", "uri", "bytes", "mtime", "sha256", "width", "height", "size_from",
                                        "error"])
    metadata = _metadata_file(images)
    ids = table["path"].str.extract(r"([^/]+)\.[^./]+$", expand=False)
    if metadata is not None:
        listed = pd.read_csv(metadata, dtype={"image_id": str, "path": str})[["image_id", "path"]]
        ids = table["path"].map(listed.set_index("path")["image_id"]).fillna(ids)
    table.insert(0, "image_id", ids)
    reasons = []
    for error, width, height in zip(table["error"], table["width"], table["height"], strict=True):
        if error is not None:
            reasons.append(error if error.startswith(TOO_LARGE) else f"undecodable: {error}")
        elif abs(width - height) >= max_aspect_difference:
            reasons.append(f"aspect: |width - height| = {abs(width - height)} >= {max_aspect_difference}")
        else:
            reasons.append(None)
    table["drop_reason"] = reasons
    table["kept"] = table["drop_reason"].isna()
    labels_path = images / LABELS_FILE
    if labels_path.is_file():
        labels = pd.read_csv(labels_path, dtype={"image_id": str, "label_name": str})[["image_id", "label",
                                                                                       "label_name"]]
        table = table.merge(labels, on="image_id", how="left")
    else:
        table["label"], table["label_name"] = None, None
    return table


class _Embedder:
    """The version's model, run as the feature cache's trunk of the same model plus the version's head (head.npz,
    versions since deltas): one backbone run gives both the features a build reads back and the vector. Without
    either, the version's SavedModel gives the vectors, and the trunk, when the cache has it, the features."""

    def __init__(self, version_dir: Path, manifest: dict, config: AddConfig) -> None:
        from builder.model import load_head
        from lookalike.runner import SavedModelEmbedder

        self.preprocess = Preprocessor(PreprocessConfig(preprocessing=manifest["preprocessing"]))
        self.batch_size = config.batch_size
        self.cache = cache_for(config, manifest)
        self.key = manifest.get("embedding", {}).get("model_key")
        trunk_dir = self.cache.trunk_dir(self.key) if self.key else None
        self.trunk = SavedModelEmbedder(trunk_dir) if trunk_dir is not None and trunk_dir.is_dir() else None
        head_file = version_dir / artifacts.HEAD_FILE
        self.from_trunk = self.trunk is not None and artifacts.HEAD_FILE in manifest["files"] and head_file.is_file()
        self.head = load_head(head_file) if self.from_trunk else None
        self.model = None if self.from_trunk else SavedModelEmbedder(version_dir / artifacts.MODEL_DIR,
                                                                     intra_op_threads=config.model_threads)

    def vectors(self, pixels: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        if not self.from_trunk:
            return self.model(pixels)
        from builder.model import l2_normalise

        return l2_normalise(self.head.apply(features) if self.head is not None else features)

    def embed(self, kept: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
        """Vectors by image id, trunk features by sha256 (when the cache has the trunk), errors by image id."""
        vectors, features, errors = {}, {}, {}
        uris, ids, digests = list(kept["uri"]), list(kept["image_id"]), list(kept["sha256"])
        for start in range(0, len(ids), self.batch_size):
            batch, good = [], []
            for uri, image_id, digest in zip(uris[start:start + self.batch_size], ids[start:start + self.batch_size],
                                             digests[start:start + self.batch_size], strict=True):
                try:
                    batch.append(self.preprocess(Path(uri.removeprefix("file:")).read_bytes()))
                    good.append((image_id, digest))
                except (ImageError, OSError) as error:
                    errors[image_id] = str(error)
            if not batch:
                continue
            pixels = np.stack(batch)
            trunk = self.trunk(pixels) if self.trunk is not None else None
            for position, ((image_id, digest), vector) in enumerate(zip(good, self.vectors(pixels, trunk),
                                                                         strict=True)):
                vectors[image_id] = vector
                if trunk is not None:
                    features[digest] = trunk[position]
        return vectors, features, errors


def cache_for(config: AddConfig, manifest: dict) -> FeatureCache:
    """The feature cache the version's build used: --feature-cache, else the one its manifest names (relative to
    its catalogue root), else OUT/.features."""
    if config.feature_cache is not None:
        return FeatureCache(config.feature_cache)
    recorded = manifest.get("embedding", {}).get("cache")
    root = manifest.get("catalogue_root")
    if recorded and root and (Path(root) / recorded).is_dir():
        return FeatureCache((Path(root) / recorded).resolve())
    return FeatureCache(config.out / DEFAULT_CACHE)


def _cache_features(config: AddConfig, manifest: dict, scanned: pd.DataFrame,
                    features: dict[str, np.ndarray]) -> dict:
    """Writes the images' trunk features and scans into the feature cache, as a build's executors would: the next
    build of a catalogue holding these files finds them there."""
    cache = cache_for(config, manifest)
    key = manifest.get("embedding", {}).get("model_key")
    scans = scanned.rename(columns={"width": "file_width", "height": "file_height"})
    cache.add_scans(scans.astype({"file_width": "Int32", "file_height": "Int32"}))
    if not key or not features:
        log.warning("the feature cache %s has no trunk of model %s: the next build will embed these images",
                    cache.root, key)
        return {"features_cached": 0, "model_key": key}
    known = cache.known(key)
    fresh = {digest: vector for digest, vector in features.items() if digest not in known}
    if fresh:
        shard = new_tmp(cache.shards_dir(key))
        shard.mkdir()
        # The schema Spark's executors write (builder/spark_jobs.py EMBED_SCHEMA): one dataset reads both.
        schema = pa.schema([("sha256", pa.string()), ("features", pa.list_(pa.float32())), ("error", pa.string())])
        pq.write_table(pa.table({"sha256": list(fresh), "features": [v.astype(np.float32) for v in fresh.values()],
                                 "error": [None] * len(fresh)}, schema=schema), shard / "part-0.parquet")
        (shard / "_SUCCESS").touch()
        shard.rename(cache.shards_dir(key) / shard_name())
    return {"features_cached": len(fresh), "model_key": key}


def _replaced(out: Path, version: str, version_dir: Path, product_ids: list[str]) -> list[str]:
    """The product ids of this delta that the version or an earlier delta already serves."""
    import pyarrow.compute as pc

    from lookalike.tables import read_products

    column = read_products(version_dir / artifacts.PRODUCTS_FILE, columns=["product_id"]).column("product_id")
    found = set(column.filter(pc.is_in(column, pa.array(product_ids, pa.string()))).to_pylist())
    found.update(deltas.delta_product_ids(out, version)[1] & set(product_ids))
    return sorted(found)


def products_not_absorbed(out: Path, product_ids: set[str]) -> dict | None:
    """What the served version's deltas hold that a new build does not: products `add` published whose files were
    not copied into the catalogue. They leave the results when the new version is served (its deltas start empty)."""
    try:
        version = artifacts.read_current(out)
    except artifacts.ArtifactError:
        return None
    published, added = deltas.delta_product_ids(out, version, skip_unreadable=True)
    if not published:
        return None
    missing = sorted(added - product_ids)
    return {"of_version": version, "deltas": published, "products": len(added),
            "not_in_this_build": {"count": len(missing), "examples": missing[:10]}}
