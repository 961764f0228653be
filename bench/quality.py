"""Retrieval quality: precision@10 and mAP@10 per backbone x pooling x head, on two labelled image sets.

Fashion-MNIST (grey clothes, 10 classes) and Debian's openclipart-png (colour clip art of real-world
objects, its top-level categories as labels). Queries never come from the catalogue, and every learned
head (PCA, PCA whitening, LDA, metric) is fitted on catalogue features alone (the metric head's held-out
split too): nothing learned sees a query.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.augment import augment
from builder.build import BuildConfig
from builder.metric import fit_supervised
from builder.model import (
    AUTO_HEAD,
    DEFAULT_TYPE_WEIGHT,
    POOLINGS,
    Head,
    Projection,
    build_feature_map_model,
    build_trunk,
    export,
    fit_head,
    gem_pool,
    l2_normalise,
)
from builder.sample import CLASS_NAMES, balanced_subset, load_split
from lookalike.preprocess import ImageError, PreprocessConfig, Preprocessor, decode

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
FEATURES = HERE / "work" / "quality"
OPENCLIPART = Path("/usr/share/openclipart/png")
# Categories that are not a kind of object, or too small to hold 10 relevant neighbours for a query.
_OPENCLIPART_SKIP = {"unsorted", "special"}
_OPENCLIPART_MIN_IMAGES = 40
# Heads a build can make, and the measured-only levers beside them.
BUILDABLE_HEADS = ("none", "pca", "lda", "metric")
SUPERVISED = ("lda", "lda (types - 1)", "metric")
SPEED_IMAGES, SPEED_BATCH = 64, 8
# Database-side augmentation (--augment-neighbours) measured on these heads, with these N: the catalogue's
# vectors are augmented, the queries' are the model's own, as a build serves a photo query.
AUGMENTED_HEADS = ("pca", "lda", "metric")
AUGMENT_NEIGHBOURS = (3, 10)
# Query expansion (FindSimilar's query_expansion, a request option) measured on these heads, with these (alpha,
# results): each query's vector averaged with its first results' vectors weighted by score^alpha, as the server does.
EXPANDED_HEADS = ("pca", "lda", "metric")
QUERY_EXPANSIONS = ((3.0, 5), (1.0, 20), (0.0, 5))  # (3, 5): the server's default when a request asks
QUERY_TIMING_QUERIES = 200  # queries timed one at a time for each row's query ms
# The server's default expansion (what a request that sets query_expansion gets) also measured on the augmented
# catalogues: a build with --augment-neighbours serves its augmented vectors to the expansion's first search.
AUGMENTED_EXPANSION = QUERY_EXPANSIONS[0]
# Issue 22's targets for precision@10 at 10,000 / 2,000 (Fashion-MNIST) and 6,119 / 1,532 (openclipart), with the
# set's labels as product types (supervised heads) and without them.
TARGETS = {"fashion-mnist": {"with product types": 0.90, "without product types": 0.84},
           "openclipart": {"with product types": 0.75}}


@dataclass
class LabelledSet:
    """Model-ready uint8 [N, 256, 256, 3] catalogue and query images with integer labels."""

    name: str
    source: str
    catalogue: np.ndarray
    catalogue_labels: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray
    label_names: tuple[str, ...]
    dropped: dict

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.catalogue_labels.tobytes() + self.query_labels.tobytes())
        return f"{self.name}-{len(self.catalogue)}-{len(self.queries)}-{digest.hexdigest()[:8]}"


def fashion_mnist(catalogue_size: int, query_count: int) -> LabelledSet:
    """Catalogue from the training split, queries from the test split (or a disjoint part of the sample)."""
    train = load_split("train")
    try:
        test = load_split("test")
        catalogue = balanced_subset(train, catalogue_size)
        queries = balanced_subset(test, query_count)
        source = "Debian dataset-fashion-mnist: catalogue from train, queries from test"
    except FileNotFoundError:
        both = balanced_subset(train, catalogue_size + query_count)
        order = np.random.default_rng(0).permutation(len(both.images))
        pick = lambda idx: type(both)(both.name, both.images[idx], both.labels[idx], both.indices[idx])  # noqa: E731
        catalogue, queries = pick(order[query_count:]), pick(order[:query_count])
        source = "committed 2,000-image sample, split into catalogue and queries"
    preprocess = Preprocessor(PreprocessConfig(preprocessing="plain"))
    model_input = lambda images: np.stack([preprocess.from_array(np.repeat(i[:, :, None], 3, axis=2))  # noqa: E731
                                           for i in images])
    return LabelledSet("fashion-mnist", source, model_input(catalogue.images), catalogue.labels.astype(int),
                       model_input(queries.images), queries.labels.astype(int), CLASS_NAMES, {})


def openclipart(query_share: float = 0.2, root: Path = OPENCLIPART) -> LabelledSet | None:
    """Debian's openclipart-png: each top-level category a label; a fifth of each category's images
    (chosen by a hash of the path, so it repeats) are the queries. Images the builder would refuse
    (over the pixel limit, undecodable) are dropped with their reason, as a build drops them."""
    if not root.is_dir():
        log.warning("%s not found (Debian's openclipart-png): the colour set is skipped", root)
        return None
    categories = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in _OPENCLIPART_SKIP)
    paths = {c: sorted((root / c).rglob("*.png")) for c in categories}
    categories = [c for c in categories if len(paths[c]) >= _OPENCLIPART_MIN_IMAGES]
    preprocess = Preprocessor(PreprocessConfig(preprocessing="plain"))

    def load(path: Path):
        try:
            return preprocess.from_array(decode(path.read_bytes())), None
        except ImageError as error:
            return None, str(error)

    listed = [(path, label) for label, c in enumerate(categories) for path in paths[c]]
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda item: load(item[0]), listed))
    dropped: dict[str, list[str]] = {}
    keep = {"catalogue": ([], []), "queries": ([], [])}
    for (path, label), (image, error) in zip(listed, loaded, strict=True):
        if image is None:
            reason = error.split(":")[0] if error.startswith("too large") else "undecodable"
            dropped.setdefault(reason, []).append(f"{path.relative_to(root)}: {error}")
            continue
        share = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        images, labels = keep["queries" if share < query_share else "catalogue"]
        images.append(image)
        labels.append(label)
    return LabelledSet("openclipart", f"Debian openclipart-png, {len(categories)} categories with at least "
                       f"{_OPENCLIPART_MIN_IMAGES} images (not {', '.join(sorted(_OPENCLIPART_SKIP))})",
                       np.stack(keep["catalogue"][0]), np.array(keep["catalogue"][1]),
                       np.stack(keep["queries"][0]), np.array(keep["queries"][1]), tuple(categories),
                       {reason: {"count": len(items), "examples": items[:3]} for reason, items in dropped.items()})


def precision_and_map_at_10(catalogue_vectors, catalogue_labels, query_vectors, query_labels) -> tuple[float, float]:
    """Exact search on unit vectors: the quality of the embedding itself, apart from the index."""
    scores = query_vectors @ catalogue_vectors.T
    top = np.argsort(-scores, axis=1)[:, :10]
    relevant = catalogue_labels[top] == query_labels[:, None]
    precision = relevant.mean()
    hits = np.cumsum(relevant, axis=1)
    precision_at_rank = hits / np.arange(1, 11)
    per_label = np.bincount(catalogue_labels, minlength=int(max(catalogue_labels.max(), query_labels.max())) + 1)
    denominators = np.minimum(10, per_label[query_labels])
    average_precision = (precision_at_rank * relevant).sum(axis=1) / np.maximum(denominators, 1)
    return float(precision), float(average_precision.mean())


def pooled_features(backbone: str, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Average- and GeM-pooled backbone features of model-ready images, from one pass over the maps."""
    model = build_feature_map_model(backbone)
    out: dict[str, list] = {"avg": [], "gem": []}
    for start in range(0, len(images), batch_size):
        maps = np.asarray(model.predict_on_batch(images[start:start + batch_size]))
        out["avg"].append(maps.mean(axis=(1, 2)))
        out["gem"].append(gem_pool(maps))
    return {pooling: np.concatenate(parts) for pooling, parts in out.items()}


def _cached_features(data: LabelledSet, backbone: str, mirrored: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """Features of catalogue then queries (or of their mirrors), kept in bench/work so a second run
    measures heads only, and the seconds the backbone took over them (when they were computed)."""
    path = FEATURES / f"{data.key}-{backbone}{'-mirrored' if mirrored else ''}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            seconds = float(stored["seconds"]) if "seconds" in stored.files else None
            return {pooling: stored[pooling] for pooling in POOLINGS}, seconds
    images = np.concatenate([data.catalogue, data.queries])
    started = time.perf_counter()
    features = pooled_features(backbone, images[:, :, ::-1] if mirrored else images)
    seconds = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, seconds=np.float64(seconds), **features)
    return features, seconds


def pca_whiten(catalogue: np.ndarray, everything: np.ndarray, dimension: int) -> np.ndarray:
    """PCA fitted on the catalogue with each axis scaled to unit variance."""
    projection = Projection.fit_pca(catalogue, dimension)
    scale = 1.0 / np.sqrt(projection.apply(catalogue).var(axis=0) + 1e-6)
    return projection.apply(everything) * scale


def heads(features: np.ndarray, n: int, labels: np.ndarray, dimension: int,
          seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Every head's vectors for catalogue (first n rows) and queries, fitted on the catalogue only; each
    head's fitting and projecting time goes into `seconds` when given."""
    types = len(np.unique(labels))
    names = np.array([str(label) for label in labels])
    fits = {
        "none": lambda: features,
        "pca": lambda: fit_head("pca", features[:n], dimension).apply(features),
        "pca-whiten": lambda: pca_whiten(features[:n], features, dimension),
        # What a build makes: type axes blended with look axes (DEFAULT_TYPE_WEIGHT).
        "lda": lambda: fit_head("lda", features[:n], dimension, names).apply(features),
        # Type axes alone: what the blend gives up for keeping look-alikes in order.
        "lda (types - 1)": lambda: Projection.fit_lda(features[:n], names, types - 1).apply(features),
        # Trained with a proxy loss, stopped on a held-out share of the catalogue (each image its own product).
        "metric": lambda: fit_supervised("metric", features[:n], names[:n], np.arange(n), dimension,
                                         DEFAULT_TYPE_WEIGHT)[0].apply(features),
    }
    out = {}
    for name, fit in fits.items():
        started = time.perf_counter()
        out[name] = fit()
        if seconds is not None:
            seconds[name] = round(time.perf_counter() - started, 2)
    return out


def with_augmented(vectors_by_head: dict[str, np.ndarray], n: int,
                   seconds: dict[str, float]) -> dict[str, np.ndarray]:
    """Unit vectors of every head, and of the augmented heads with their catalogue rows (the first n)
    augmented and their queries as they were; an augmented row's seconds are its head's plus the augmentation."""
    out = {}
    for head, raw in vectors_by_head.items():
        out[head] = l2_normalise(raw)
        if head not in AUGMENTED_HEADS:
            continue
        for neighbours in AUGMENT_NEIGHBOURS:
            name = f"{head} + augment {neighbours}"
            started = time.perf_counter()
            out[name] = np.vstack([augment(out[head][:n], neighbours), out[head][n:]])
            seconds[f"{name} alone"] = round(time.perf_counter() - started, 2)
            seconds[name] = round(seconds[head] + seconds[f"{name} alone"], 2)
    return out


def base_head(name: str) -> str:
    return name.split(" + ")[0]


def expand_queries(catalogue: np.ndarray, queries: np.ndarray, alpha: float, results: int) -> np.ndarray:
    """Alpha-query expansion of unit query vectors against unit catalogue vectors (each image its own product): the
    query plus its `results` nearest catalogue vectors weighted by max(0, score)^alpha, normalised."""
    scores = queries @ catalogue.T
    top = np.argpartition(-scores, results - 1, axis=1)[:, :results]
    top_scores = np.take_along_axis(scores, top, axis=1)
    weights = np.where(top_scores > 0, np.maximum(top_scores, 0) ** alpha, 0.0)
    return l2_normalise(queries + np.einsum("qr,qrd->qd", weights, catalogue[top]))


def query_ms(catalogue: np.ndarray, queries: np.ndarray, expansion: tuple[float, int] | None) -> float:
    """The median CPU milliseconds (the process's, every thread's) of an exact top-10 search, one query at a time
    (with the expansion: both searches). CPU time, not wall time: on a host loaded to several times its cores, a
    niced query's wall time is mostly its wait for a core (medians of 6 to 16 ms against 0.2 to 0.4 of work)."""
    seconds = []
    for query in queries[:QUERY_TIMING_QUERIES]:
        started = time.process_time()
        query = query[None, :]
        if expansion is not None:
            query = expand_queries(catalogue, query, *expansion)
        np.argpartition(-(query @ catalogue.T)[0], 9)[:10]
        seconds.append(time.process_time() - started)
    return round(1000 * float(np.median(seconds)), 3)


def with_expanded_queries(vectors_by_head: dict[str, np.ndarray], n: int) -> tuple[dict[str, np.ndarray], dict]:
    """The expanded heads' vectors again with their queries expanded (QUERY_EXPANSIONS; their augmented catalogues
    with the server's default expansion alone), and each row's query ms."""
    out, times = {}, {}
    augmented = [f"{head} + augment {neighbours}" for head in EXPANDED_HEADS for neighbours in AUGMENT_NEIGHBOURS]
    for head in [*EXPANDED_HEADS, *(name for name in augmented if name in vectors_by_head)]:
        catalogue, queries = vectors_by_head[head][:n], vectors_by_head[head][n:]
        times[head] = query_ms(catalogue, queries, None)
        for alpha, results in QUERY_EXPANSIONS if head in EXPANDED_HEADS else (AUGMENTED_EXPANSION,):
            name = f"{head} + query expansion {alpha:g}, {results}"
            out[name] = np.vstack([catalogue, expand_queries(catalogue, queries, alpha, results)])
            times[name] = query_ms(catalogue, queries, (alpha, results))
    return out, times


def auto_head(features: np.ndarray, n: int, labels: np.ndarray, dimension: int) -> dict:
    """What a default build's `--head auto` picks on this catalogue (each image its own product, as the metric
    row): lda or metric by their held-out precision@10, with the figures it chose by."""
    started = time.perf_counter()
    names = np.array([str(label) for label in labels])
    _, report = fit_supervised(AUTO_HEAD, features[:n], names, np.arange(n), dimension, DEFAULT_TYPE_WEIGHT)
    held_out = report["held_out"]
    return {"chosen": report["chosen"], "held_out_precision_at_10": held_out["precision_at_10"],
            "held_out_queries": held_out["queries"],
            "margin": held_out["margin"],
            "metric_epochs": report["metric"]["epochs"], "seconds": round(time.perf_counter() - started, 1)}


def model_images_per_s(backbone: str, pooling: str, mirror: bool, head: Head, images: np.ndarray) -> float:
    """The exported SavedModel (trunk + head + normalisation) run in-process at batch 8, all cores."""
    from lookalike.runner import SavedModelEmbedder

    with tempfile.TemporaryDirectory() as folder:
        export(build_trunk(backbone, "pca", pooling=pooling, mirror=mirror), folder, head)
        model = SavedModelEmbedder(folder)
        batches = [images[i:i + SPEED_BATCH] for i in range(0, SPEED_IMAGES, SPEED_BATCH)]
        model(batches[0])
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        return SPEED_IMAGES / (time.perf_counter() - started)


def index_megabytes(vectors: np.ndarray, n_trees: int = 10) -> float:
    from annoy import AnnoyIndex

    index = AnnoyIndex(vectors.shape[1], "angular")
    for row, vector in enumerate(vectors):
        index.add_item(row, vector)
    index.build(n_trees, n_jobs=1)
    with tempfile.TemporaryDirectory() as folder:
        index.save(f"{folder}/index.ann")
        return round(Path(f"{folder}/index.ann").stat().st_size / 1e6, 2)


def evaluate_set(data: LabelledSet, backbones, mirror_backbones=(), dimension: int = 128, speed: bool = True) -> dict:
    n = len(data.catalogue)
    flat = lambda images: l2_normalise(images[:, ::8, ::8].reshape(len(images), -1).astype(np.float32))  # noqa: E731
    p10, map10 = precision_and_map_at_10(flat(data.catalogue), data.catalogue_labels, flat(data.queries),
                                         data.query_labels)
    floor = {"backbone": "raw pixels (32x32)", "pooling": "-", "mirror": False, "head": "none", "dimension": 3072,
             "precision_at_10": round(p10, 4), "map_at_10": round(map10, 4)}
    rows, sizes, feature_seconds, auto = [], {}, {}, None
    defaults = BuildConfig(images=Path("."), out=Path("."))
    for backbone in backbones:
        started = time.perf_counter()
        features, feature_seconds[backbone] = _cached_features(data, backbone)
        trunks = [(pooling, False, features[pooling]) for pooling in POOLINGS]
        if backbone in mirror_backbones:
            flipped, _ = _cached_features(data, backbone, mirrored=True)
            trunks.append(("gem", True, (features["gem"] + flipped["gem"]) / 2))
        log.info("%s %s features in %.0f s", data.name, backbone, time.perf_counter() - started)
        for pooling, mirror, pooled in trunks:
            if defaults.head == AUTO_HEAD and (backbone, pooling, mirror) == (defaults.backbone, defaults.pooling,
                                                                              defaults.mirror):
                auto = auto_head(pooled, n, data.catalogue_labels, dimension)
            seconds: dict[str, float] = {}
            vectors_by_head = with_augmented(heads(pooled, n, data.catalogue_labels, dimension, seconds), n, seconds)
            expanded, times = with_expanded_queries(vectors_by_head, n)
            vectors_by_head.update(expanded)
            rate = None
            if speed:
                head = fit_head("pca", pooled[:n], dimension)
                rate = round(model_images_per_s(backbone, pooling, mirror, head, data.catalogue), 1)
            for head, vectors in vectors_by_head.items():
                p10, map10 = precision_and_map_at_10(vectors[:n], data.catalogue_labels, vectors[n:],
                                                     data.query_labels)
                if vectors.shape[1] not in sizes:
                    sizes[vectors.shape[1]] = index_megabytes(vectors[:n])
                rows.append({"backbone": backbone, "pooling": pooling, "mirror": mirror, "head": head,
                             "dimension": int(vectors.shape[1]), "supervised": base_head(head) in SUPERVISED,
                             "buildable": base_head(head) in BUILDABLE_HEADS, "precision_at_10": round(p10, 4),
                             "map_at_10": round(map10, 4), "images_per_s": rate,
                             "index_mb": sizes[vectors.shape[1]],
                             "fit_s": seconds.get(head, seconds.get(base_head(head))),
                             "augment_s": seconds.get(f"{head.split(' + query expansion')[0]} alone"),
                             "query_expansion": " + query expansion" in head, "query_ms": times.get(head)})
                log.info("%s %s", data.name, rows[-1])
    # Both sets have labels, so the default build's auto head is lda or metric, by the held-out split.
    head = auto["chosen"] if auto is not None else defaults.head
    default = next((r for r in rows if (r["backbone"], r["pooling"], r["mirror"], r["head"]) ==
                    (defaults.backbone, defaults.pooling, defaults.mirror, head)), None)
    rank = lambda r: (r["precision_at_10"], r["map_at_10"])  # noqa: E731
    # A build's best: query expansion is a request's option (reported beside them), not something a build makes.
    unsupervised = [r for r in rows if r["buildable"] and not r["supervised"] and not r["query_expansion"]]
    supervised = [r for r in rows if r["buildable"] and r["supervised"] and not r["query_expansion"]]
    return {"data_set": data.name, "source": data.source, "catalogue_size": n, "query_count": len(data.queries),
            "labels": list(data.label_names), "dropped": data.dropped, "raw_pixel_floor": floor, "rows": rows,
            "features_s": feature_seconds, "auto_head": auto,
            "best_unsupervised": max(unsupervised, key=rank), "best_supervised": max(supervised, key=rank),
            "default": default}


def describe(row: dict) -> str:
    """backbone / pooling[, mirrored] / head, as a build's options name them."""
    trunk = f"{row['pooling']} + mirror" if row.get("mirror") else row["pooling"]
    return f"{row['backbone']} / {trunk} / {row['head']}"


def evaluate(catalogue_size: int, query_count: int, backbones, mirror_backbones=(), colour_set: bool = True) -> dict:
    """Both sets (the colour set when Debian's package is installed and asked for)."""
    sets = {"fashion-mnist": evaluate_set(fashion_mnist(catalogue_size, query_count), backbones, mirror_backbones)}
    if colour_set:
        clip_art = openclipart()
        if clip_art is not None:
            sets["openclipart"] = evaluate_set(clip_art, backbones, mirror_backbones)
    return {"sets": sets}


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.quality`: the quality tables alone (no index, serving or build), as markdown; with --section,
    also BENCHMARKS.md's section on the levers against issue 22's targets (from the results written to --json)."""
    import argparse
    import datetime
    import json
    import os
    import sys

    from bench.report import _quality, write_levers_section

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=main.__doc__)
    parser.add_argument("--catalogue", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--sets", nargs="*", choices=["fashion-mnist", "openclipart"],
                        default=["fashion-mnist", "openclipart"],
                        help="openclipart only when Debian's package is; none: --section from --json alone")
    parser.add_argument("--colour-set", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-colour-set: as --sets fashion-mnist")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="the exported model's images/s, on the Fashion-MNIST catalogue")
    parser.add_argument("--json", type=Path, help="also write the results here (keeping the sets this run did not "
                        "measure from the file's previous results)")
    parser.add_argument("--section", action="store_true", help="also write BENCHMARKS.md's levers section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    measured = {}
    loaders = {"fashion-mnist": lambda: fashion_mnist(args.catalogue, args.queries), "openclipart": openclipart}
    for name in args.sets:
        if name == "openclipart" and not args.colour_set:
            continue
        started, load = time.perf_counter(), os.getloadavg()[0]
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        data = loaders[name]()
        if data is None:
            continue
        found = evaluate_set(data, args.backbones, speed=args.speed and name == "fashion-mnist")
        found["run"] = {"command": command, "started_at": at, "seconds": round(time.perf_counter() - started),
                        "cores": os.cpu_count(), "niceness": os.nice(0),
                        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}
        measured[name] = found
    # Read again now, so that two runs of different sets at once both land.
    kept = json.loads(args.json.read_text())["sets"] if args.json and args.json.exists() else {}
    results = {"sets": {name: measured.get(name, kept.get(name)) for name in loaders if name in {*measured, *kept}}}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.section:
        write_levers_section(results)
    print("\n".join(_quality(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
