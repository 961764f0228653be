"""`lookalike-build`: write the sample catalogue, build and publish versions, and operate a catalogue:
hide and show products, list versions, roll back, prune."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lookalike.settings import OneLineArgumentParser, env_default


def _parser() -> argparse.ArgumentParser:
    from builder.backbones import SPECS
    from builder.build import BuildConfig
    from builder.model import AUTO_HEAD, HEADS, POOLINGS

    defaults = BuildConfig(images=Path("."), out=Path("."))
    parser = OneLineArgumentParser(prog="lookalike-build", description=__doc__)
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="write a sample catalogue in the ABO layout")
    sample.add_argument("dataset", choices=["fashion-mnist"])
    sample.add_argument("--out", type=Path, required=True, help="folder to write small/ and images.csv.gz to")
    sample.add_argument("--limit", type=int, default=None,
                        help="at most this many products, balanced over the classes (default: all)")
    sample.add_argument("--max-images-per-product", type=int, default=4, choices=range(1, 5), metavar="1..4",
                        help="each product has a main image and up to this many minus one derived views")
    sample.add_argument("--split", choices=["train", "test"], default="train",
                        help="Fashion-MNIST split; the test split needs Debian's dataset-fashion-mnist")

    build = commands.add_parser("build", help="scan, filter, embed, index and publish a version")
    build.add_argument("--images", type=Path, required=True, default=env_default("images", None),
                       help="catalogue root: small/<2 hex>/<file> and images.csv.gz (or metadata/)")
    build.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder: versions and CURRENT")
    build.add_argument("--listings", type=Path, default=env_default("listings", None),
                       help="ABO listings folder (listings_*.json.gz); default: <images>/listings/metadata or "
                            "<images>/../listings/metadata")
    build.add_argument("--products-csv", type=Path, default=env_default("products_csv", None),
                       help="product_id,image_id[,role],attributes... for a catalogue without ABO listings "
                            "(default: <images>/products.csv when present)")
    build.add_argument("--language", default=env_default("language", defaults.language),
                       help="language of product attributes; falls back to the same language elsewhere, then any")
    build.add_argument("--spark-master", default=env_default("spark_master", defaults.spark_master),
                       help="any Spark master URL, e.g. spark://host:7077 (default local[*])")
    build.add_argument("--max-aspect-difference", type=int,
                       default=env_default("max_aspect_difference", defaults.max_aspect_difference),
                       help="drop images whose |width - height| is at least this (the seed's 200)")
    build.add_argument("--backbone", default=env_default("backbone", defaults.backbone),
                       choices=sorted(SPECS))
    build.add_argument("--weights-file", default=env_default("weights_file", None),
                       help="a local weights file instead of the packaged one (needed for vgg16 offline)")
    build.add_argument("--preprocessing", default=env_default("preprocessing", defaults.preprocessing),
                       choices=["clahe-grey", "plain"])
    build.add_argument("--head", default=env_default("head", defaults.head), choices=(AUTO_HEAD, *HEADS),
                       help="pca: fitted on the catalogue's features; lda: learned from the catalogue's product "
                            "types (--label-key); metric: trained on the product types with a proxy loss, stopped "
                            "on a held-out tenth of the catalogue's products; none: the pooled features; auto "
                            "(default): with product types, lda, or metric when it beats lda on the held-out "
                            "products by more than noise; else pca")
    build.add_argument("--dimension", type=int, default=env_default("dimension", defaults.dimension),
                       help="output dimension of the pca, lda and metric heads")
    build.add_argument("--pooling", default=env_default("pooling", defaults.pooling), choices=POOLINGS,
                       help="how the last feature map becomes a vector: avg, or gem (generalized mean, p = 3)")
    build.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                       default=env_default("mirror", defaults.mirror),
                       help="average each image's features with its left-right mirror's (twice the model work)")
    build.add_argument("--label-key", default=env_default("label_key", defaults.label_key),
                       help="the product attribute a supervised head (lda, metric) learns from")
    build.add_argument("--type-weight", type=float, default=env_default("type_weight", defaults.type_weight),
                       help="lda head: share of similarity that is product type (the rest is look), in (0, 1)")
    build.add_argument("--index", default=env_default("index", defaults.index), choices=["annoy", "hnsw"],
                       help="annoy (default; memory-mapped, shared by every worker) or hnsw (hnswlib: faster per "
                            "query at ABO's size; every worker holds its own copy in memory)")
    build.add_argument("--n-trees", type=int, default=env_default("n_trees", defaults.n_trees),
                       help="Annoy's fewest trees: the builder tries this many, doubling up to 80, and keeps the "
                            "trees and search_k whose query reaches --target-recall fastest")
    build.add_argument("--target-recall", type=float, default=env_default("target_recall", defaults.target_recall),
                       help="recall@10 the chosen search_k must reach against exact search")
    _add_neighbours(build, defaults.neighbours)
    build.add_argument("--augment-neighbours", type=int,
                       default=env_default("augment_neighbours", defaults.augment_neighbours),
                       help="database-side augmentation: replace each catalogue vector by the similarity-weighted "
                            "mean of itself and its N nearest catalogue images before indexing (0: off); photo "
                            "queries are not augmented, queries by image or product id use the augmented vectors")
    build.add_argument("--chunk-size", type=int, default=env_default("chunk_size", defaults.chunk_size),
                       help="images per resumable unit: less is lost on interruption, more Spark jobs")
    build.add_argument("--batch-size", type=int, default=env_default("batch_size", defaults.batch_size),
                       help="images per model call in an executor")
    build.add_argument("--threads-per-task", type=int,
                       default=env_default("threads_per_task", defaults.threads_per_task),
                       help="TensorFlow threads per Spark task (one task runs per core)")
    build.add_argument("--version", default=None, help="version name (default: UTC time + random suffix)")
    build.add_argument("--feature-cache", type=Path, default=env_default("feature_cache", None),
                       help="where scans and features are kept by content (default: OUT/.features); several "
                            "builds and catalogues may share one")
    build.add_argument("--nice", type=int, default=env_default("nice", 10),
                       help="CPU niceness of the build and its Spark workers, so that a server on the same host "
                            "keeps its latency (0 to run at normal priority)")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    _add_file_mode(build)

    for name, text in (("hide", "stop serving products (out of stock, delisted, blocked) without a rebuild"),
                       ("unhide", "serve hidden products again")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
        command.add_argument("product_ids", nargs="*", metavar="PRODUCT_ID")
        command.add_argument("--file", type=Path, help="a file of product ids, one per line")
        if name == "hide":
            command.add_argument("--reason", default="out_of_stock", choices=["out_of_stock", "delisted", "blocked"])
        _add_file_mode(command)
    versions = commands.add_parser("versions", help="published versions, oldest first; CURRENT and leased marked")
    versions.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
    versions.add_argument("--json", action="store_true")
    rollback = commands.add_parser("rollback", help="point CURRENT at the previous (or the named) version")
    rollback.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
    rollback.add_argument("version", nargs="?", help="the version to serve (default: the one before CURRENT)")
    _add_file_mode(rollback)
    prune = commands.add_parser("prune", help="remove old versions and the cached features no kept version uses")
    prune.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
    prune.add_argument("--keep", type=int, required=True, help="how many of the newest versions to keep")
    prune.add_argument("--cache-grace-s", type=float, default=3600.0,
                       help="leave cached features and leftovers younger than this (a build may be using them)")
    _add_file_mode(prune)

    add = commands.add_parser("add", help="publish new or changed products as a delta of the served version, in "
                                          "seconds (embedded with its own model; no Spark, no rebuild)")
    add.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder (the delta is of CURRENT's version)")
    add.add_argument("--images", type=Path, required=True,
                     help="a folder in a layout build reads: small/<files> with ABO listings, a products.csv, or "
                          "neither (each image its own product); a product already served is replaced whole")
    add.add_argument("--listings", type=Path, default=None, help="ABO listings folder (default: found under --images)")
    add.add_argument("--products-csv", type=Path, default=None,
                     help="product_id,image_id[,role,attributes...] (default: --images/products.csv when present)")
    add.add_argument("--language", default="en_US", help="language of the listings' attributes")
    add.add_argument("--max-delta-rows", type=int, default=env_default("max_delta_rows", 10_000),
                     help="image rows the version's deltas may hold together; past it, run a build (servers scan "
                          "delta rows exactly on every query)")
    add.add_argument("--feature-cache", type=Path, default=None,
                     help="the build's feature cache (default: the one the version's manifest names)")
    add.add_argument("--json", action="store_true", help="print the delta's manifest as JSON")
    _add_file_mode(add)
    deltas_command = commands.add_parser("deltas", help="the deltas of a version (default: CURRENT's), oldest first")
    deltas_command.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
    deltas_command.add_argument("--version", default=None, help="the version (default: the one CURRENT names)")
    deltas_command.add_argument("--json", action="store_true")

    reindex = commands.add_parser("reindex", help="a new version from an existing one's vectors and tables, with "
                                                  "its index and neighbour lists derived again (nothing embedded)")
    reindex.add_argument("--out", type=Path, required=True, help="ARTIFACTS folder")
    reindex.add_argument("--version", default=None,
                         help="the version whose vectors and tables to reuse (default: the one CURRENT names)")
    reindex.add_argument("--new-version", default=None,
                         help="the new version's name (default: UTC time + random suffix)")
    reindex.add_argument("--index", default=env_default("index", None), choices=["annoy", "hnsw"],
                         help="the index to build (default: the kind the version has)")
    reindex.add_argument("--n-trees", type=int, default=env_default("n_trees", defaults.n_trees),
                         help="Annoy trees: more = better recall per search_k, bigger index")
    reindex.add_argument("--target-recall", type=float,
                         default=env_default("target_recall", defaults.target_recall),
                         help="recall@10 the chosen search_k must reach against exact search")
    _add_neighbours(reindex, defaults.neighbours)
    reindex.add_argument("--spark-master", default=env_default("spark_master", defaults.spark_master),
                         help="any Spark master URL; the lists are computed in its executors")
    reindex.add_argument("--nice", type=int, default=env_default("nice", 10),
                         help="CPU niceness of the reindex and its Spark workers (0: normal priority)")
    reindex.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    _add_file_mode(reindex)
    return parser


def _add_neighbours(command: argparse.ArgumentParser, default: int) -> None:
    command.add_argument("--neighbours", type=int, default=env_default("neighbours", default),
                         help="each product's and image's exact top-N products, computed on Spark and served by "
                              "lookup (0: no lists; about a quarter of an hour here at ABO's size)")


def _add_file_mode(command: argparse.ArgumentParser) -> None:
    command.add_argument("--file-mode", type=_octal_mode, default=env_default("file_mode", None),
                         help="mode of the files this command writes in ARTIFACTS, e.g. 0640 (folders get the "
                              "matching search bits); default: what the umask gives (0644 under umask 022), so "
                              "servers running as another user can read them")


def _octal_mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0644") from None


def _product_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.product_ids)
    if args.file is not None:
        if not args.file.is_file():
            raise UsageError(f"--file {args.file} is not a file")
        ids += [line.strip() for line in args.file.read_text().splitlines() if line.strip()]
    if not ids:
        raise UsageError("give product ids, or --file with one per line")
    return ids


def _artifacts_folder(out: Path) -> Path:
    if not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    return out


def _operate(args: argparse.Namespace) -> int:
    """hide, unhide, versions, rollback, prune: no Spark, no TensorFlow."""
    from lookalike import artifacts
    from lookalike.leases import leased_versions

    out = _artifacts_folder(args.out)
    if args.command in ("hide", "unhide"):
        from lookalike.availability import change_availability

        ids = _product_ids(args)
        hide = args.command == "hide"
        state, changed = change_availability(out, hide=ids if hide else (), show=() if hide else ids,
                                             reason=getattr(args, "reason", "out_of_stock"))
        unknown = _unknown_products(out, ids)
        print(f"availability version {state.version}: {changed} of {len(ids)} products "
              f"{'hidden' if hide else 'shown again'}; {len(state.hidden)} hidden in all")
        if unknown:
            print(f"note: {len(unknown)} of them are not in the served version (e.g. {unknown[0]}); the state "
                  f"applies to any version that has them", file=sys.stderr)
        return 0
    if args.command == "versions":
        from builder.operate import list_versions

        current = artifacts.read_current(out) if (out / artifacts.CURRENT).exists() else None
        leased = {v for held in leased_versions(out).values() for v in held}
        rows = [{"version": v.name, "created_at": v.created_at, "products": v.products, "images": v.images,
                 "current": v.name == current, "leased": v.name in leased} for v in list_versions(out)]
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in rows if not args.json else []:
            marks = " ".join(m for m, on in (("CURRENT", row["current"]), ("leased", row["leased"])) if on)
            print(f"{row['version']:<32}{row['created_at']:<28}{row['products'] or '-':>8} products "
                  f"{row['images'] or '-':>8} images  {marks}")
        return 0
    if args.command == "rollback":
        from builder.operate import rollback

        before, after = rollback(out, args.version)
        print(f"CURRENT: {before} -> {after}")
        return 0
    from builder.operate import prune

    report = prune(out, args.keep, args.cache_grace_s)
    print(f"kept {len(report.kept)} versions, removed {len(report.removed)}"
          + (f" ({', '.join(report.removed)})" if report.removed else ""))
    if report.leased:
        print("leased by running servers: " + "; ".join(f"{h}: {', '.join(v)}" for h, v in report.leased.items()))
    cache = report.cache
    if cache.get("present"):
        print(f"feature cache {cache['cache']}: {cache['features_before']} -> {cache['features_after']} features "
              f"in compacted shards, {len(cache['models_removed'])} models removed")
    return 0


def _unknown_products(out: Path, ids: list[str]) -> list[str]:
    """The ids the served version does not hold (a typo, or a product not built yet)."""
    from lookalike import artifacts
    from lookalike.tables import read_products

    try:
        version_dir = out / artifacts.read_current(out)
        known = set(read_products(version_dir / artifacts.PRODUCTS_FILE, columns=["product_id"])
                    .column("product_id").to_pylist())
    except (artifacts.ArtifactError, OSError, ValueError):  # no readable served version: nothing to say
        return []
    return [i for i in ids if i not in known]


def _check_build_inputs(args: argparse.Namespace) -> None:
    """Mistakes a user can make on the command line, found before Spark or TensorFlow start."""
    from builder.augment import check_augment_neighbours
    from builder.catalogue import check_language

    check_language(args.language)
    check_augment_neighbours(args.augment_neighbours)
    small = args.images / "small"
    if not args.images.is_dir():
        raise UsageError(f"--images {args.images} is not a folder")
    if not small.is_dir():
        raise UsageError(f"--images {args.images} has no small/ folder (the ABO layout: small/<2 hex>/<file>)")
    if not any(path.is_file() for path in small.rglob("*")):
        raise UsageError(f"--images {args.images} has no image files under small/")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.listings is not None and not args.listings.is_dir():
        raise UsageError(f"--listings {args.listings} is not a folder")
    if args.products_csv is not None and not args.products_csv.is_file():
        raise UsageError(f"--products-csv {args.products_csv} is not a file")
    if args.weights_file is not None and not Path(args.weights_file).is_file():
        raise UsageError(f"--weights-file {args.weights_file} is not a file")


class UsageError(ValueError):
    """A command-line mistake: reported in one line, exit status 2."""


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "file_mode", None) is not None:
        from lookalike.artifacts import use_file_mode

        use_file_mode(args.file_mode)
    if args.command == "sample":
        from builder.sample import write_sample

        if args.limit is not None and args.limit < 1:
            raise UsageError("--limit must be at least 1")
        products, images = write_sample(args.out, args.limit, args.split, args.max_images_per_product)
        print(f"wrote {products} products with {images} images to {args.out}")
        return 0
    if args.command == "reindex":
        return _reindex(args)
    if args.command == "add":
        return _add(args)
    if args.command == "deltas":
        return _deltas(args)
    if args.command != "build":
        return _operate(args)
    _check_build_inputs(args)
    _be_nice(args.nice)
    from builder.build import BuildConfig, run_build

    config = BuildConfig(images=args.images, out=args.out, listings=args.listings, products_csv=args.products_csv,
                         language=args.language, spark_master=args.spark_master,
                         max_aspect_difference=args.max_aspect_difference, backbone=args.backbone,
                         preprocessing=args.preprocessing, head=args.head, dimension=args.dimension,
                         pooling=args.pooling, mirror=args.mirror, label_key=args.label_key,
                         type_weight=args.type_weight,
                         index=args.index, n_trees=args.n_trees, target_recall=args.target_recall,
                         chunk_size=args.chunk_size,
                         batch_size=args.batch_size, threads_per_task=args.threads_per_task,
                         weights_file=args.weights_file, version=args.version, feature_cache=args.feature_cache,
                         neighbours=args.neighbours, augment_neighbours=args.augment_neighbours)
    result = run_build(config)
    if args.json:
        print(json.dumps(result.manifest, indent=2))
    else:
        counts, index = result.manifest["counts"], result.manifest["index"]
        print(f"published {result.version}: {counts['products']} products with {counts['images_indexed']} images "
              f"indexed (kept {counts['kept']}, dropped {counts['dropped']}); " + _index_summary(index))
    return 0


def _reindex(args: argparse.Namespace) -> int:
    """reindex: Spark for the lists, Annoy for the index; no TensorFlow."""
    out = _artifacts_folder(args.out)
    _be_nice(args.nice)
    from builder.reindex import ReindexConfig, run_reindex

    result = run_reindex(ReindexConfig(out=out, source=args.version, index=args.index, n_trees=args.n_trees,
                                       target_recall=args.target_recall, neighbours=args.neighbours,
                                       spark_master=args.spark_master, version=args.new_version))
    if args.json:
        print(json.dumps(result.manifest, indent=2))
        return 0
    index, lists = result.manifest["index"], result.manifest.get("neighbours")
    print(f"published {result.version} from {result.manifest['reindexed_from']['version']}: {index['kind']} index "
          f"with recall@10 {index['recall_at_10']}; "
          + (f"neighbour lists of {lists['n']} (recall@10 {lists['recall_at_10']})" if lists else "no neighbour lists"))
    return 0


def _add(args: argparse.Namespace) -> int:
    """add: the served version's own model, in this process; no Spark."""
    out = _artifacts_folder(args.out)
    if not (args.images / "small").is_dir():
        raise UsageError(f"--images {args.images} has no small/ folder (the layout build reads: small/<files>)")
    if args.listings is not None and not args.listings.is_dir():
        raise UsageError(f"--listings {args.listings} is not a folder")
    if args.products_csv is not None and not args.products_csv.is_file():
        raise UsageError(f"--products-csv {args.products_csv} is not a file")
    from builder.add import AddConfig, run_add

    result = run_add(AddConfig(out=out, images=args.images, listings=args.listings, products_csv=args.products_csv,
                               language=args.language, max_delta_rows=args.max_delta_rows,
                               feature_cache=args.feature_cache))
    manifest = result.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    counts, embedding = manifest["counts"], manifest["embedding"]
    print(f"published delta {result.sequence} of {result.version}: {counts['products']} products with "
          f"{counts['images']} images ({counts['replaced_products']} replaced, {counts['dropped']} images dropped); "
          f"{embedding['embedded']} embedded, {embedding['features_cached']} features cached for the next build; "
          f"{manifest['seconds']:.1f} s")
    for dropped in manifest["dropped"][:5]:
        print(f"dropped {dropped['image_id']}: {dropped['reason']}", file=sys.stderr)
    if manifest["attribute_keys_not_served"]:
        print(f"note: attributes {', '.join(manifest['attribute_keys_not_served'])} are not in version "
              f"{result.version}: served after the next build", file=sys.stderr)
    return 0


def _deltas(args: argparse.Namespace) -> int:
    from lookalike import artifacts
    from lookalike.deltas import DELTA_MANIFEST, list_deltas

    out = _artifacts_folder(args.out)
    version = args.version or artifacts.read_current(out)
    rows = []
    for sequence, path in list_deltas(out, version):
        try:
            manifest = json.loads((path / DELTA_MANIFEST).read_text())
        except (OSError, ValueError) as error:
            rows.append({"sequence": sequence, "error": str(error)})
            continue
        rows.append({"sequence": sequence, "created_at": manifest.get("created_at"), **manifest.get("counts", {})})
    if args.json:
        print(json.dumps({"version": version, "deltas": rows}, indent=2))
        return 0
    print(f"version {version}: {len(rows)} deltas, {sum(r.get('images', 0) for r in rows)} image rows")
    for row in rows:
        print(f"{row['sequence']:>6}  " + (f"unreadable: {row['error']}" if "error" in row else
              f"{row['created_at']:<26}{row['products']:>7} products {row['images']:>7} images "
              f"{row['replaced_products']:>6} replaced"))
    return 0


def _be_nice(nice: int) -> None:
    if nice:
        # Spark's JVM and its Python workers inherit it: a server on this host keeps the CPU it needs.
        os.nice(nice)


def _index_summary(index: dict) -> str:
    if index.get("kind") == "hnsw":
        return f"hnsw M {index['M']}, ef_search {index['ef_search']}, recall@10 {index['recall_at_10']}"
    return f"n_trees {index['n_trees']}, search_k {index['search_k']}, recall@10 {index['recall_at_10']}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lookalike.artifacts import ArtifactError

    try:
        return _run(args)
    # ValueError covers UsageError, CatalogueError, BuildConfig's checks and a catalogue with nothing to index.
    except (ValueError, ArtifactError, FileExistsError, FileNotFoundError) as error:
        print(f"lookalike-build: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
