"""`lookalike`: talk to a lookalike server: info, health, embed, similar and recommend (with a contact sheet),
bench."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import re
import sys
from pathlib import Path

from client.library import STRATEGIES, Clause, Cropped, ImageSimilarityClient, LookalikeError, Range


class _OneLineParser(argparse.ArgumentParser):
    """A command-line mistake is one line on stderr and exit status 2 (argparse adds the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


# A clause as a command line writes it: the key (an identifier), then the operator, then the value(s).
_CLAUSE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(!=|>=|<=|=|>|<)(.*)$")
_RANGES = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
CLAUSE_FORMS = "KEY=V1,V2, KEY!=V1,V2, KEY<X, KEY<=X, KEY>X or KEY>=X"


def _clause(text: str) -> Clause:
    """KEY=V1,V2 (the product's KEY is one of them), KEY!=V1,V2 (none of them), or KEY<X, KEY<=X, KEY>X, KEY>=X (a
    number KEY in that range)."""
    match = _CLAUSE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not {CLAUSE_FORMS}")
    key, operator, value = match.groups()
    if operator in _RANGES:
        try:
            bound = float(value)
        except ValueError:
            bound = math.nan
        if math.isnan(bound):
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number (KEY{operator}X takes one)")
        return Clause(key, range=Range(**{_RANGES[operator]: bound}))
    values = tuple(v for v in value.split(",") if v)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} needs a key and at least one value")
    return Clause(key, none_of=values) if operator == "!=" else Clause(key, any_of=values)


def _region(text: str) -> tuple[float, ...]:
    """X_MIN,Y_MIN,X_MAX,Y_MAX, relative to the image's width and height."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not X_MIN,Y_MIN,X_MAX,Y_MAX (four numbers in 0..1)")
    return values


def _query_expansion(text: str):
    """ALPHA[,RESULTS] (either may be empty for the server's default), or "default" for both."""
    if text == "default":
        return True
    parts = text.split(",")
    try:
        if len(parts) > 2:
            raise ValueError
        alpha = float(parts[0]) if parts[0] else None
        results = int(parts[1]) if len(parts) == 2 and parts[1] else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ALPHA[,RESULTS] (e.g. 3 or 3,10) or default") from None
    return alpha, results


def _add_region(command: argparse.ArgumentParser, which: str) -> None:
    command.add_argument("--region", type=_region, metavar="X_MIN,Y_MIN,X_MAX,Y_MAX",
                         help=f"use only this box of {which}, relative to its width and height, e.g. 0.1,0.2,0.6,0.9")


def _add_result_options(command: argparse.ArgumentParser) -> None:
    """What similar and recommend share: k, filters, threshold, groups, attributes, output."""
    command.add_argument("-k", type=int, default=10, help="how many products")
    command.add_argument("--filter", dest="filters", type=_clause, action="append", default=[],
                         metavar="KEY=V1,V2|KEY!=V1,V2|KEY<X|KEY>=X",
                         help="only products whose KEY is one of the values (=) or none of them (!=), or whose number "
                              "KEY is in a range (<, <=, >, >=; quote it for the shell: 'item_weight_pounds<2.5'); "
                              "repeat to AND clauses")
    command.add_argument("--exclude-product", dest="exclude_products", action="append", default=[], metavar="ID",
                         help="never return this product (repeatable)")
    command.add_argument("--score-threshold", type=float,
                         help="leave out matches scoring below this (-1..1; with --strategy sum_scores, "
                              "-(P + N)..P + N for P positive and N negative examples)")
    command.add_argument("--diversity", type=float, metavar="D",
                         help="0..1: choose results unlike each other (maximal marginal relevance); 0, the default, "
                              "is the plain ranking")
    command.add_argument("--candidates", type=int, default=0, metavar="N",
                         help="with --diversity: how many of the most relevant products to choose among (default: "
                              "the server's, 4 x k within its bounds)")
    command.add_argument("--group-size", type=int, default=0, help="list up to this many images of each product")
    command.add_argument("--with-attributes", action="store_true", help="show each product's attributes")
    command.add_argument("--catalogue", type=Path, default=os.environ.get("LOOKALIKE_CATALOGUE"),
                         help="catalogue root (small/ ...), to show product pictures on a sheet")
    command.add_argument("--sheet", type=Path, help="write a contact sheet PNG: the query beside one tile per product")
    command.add_argument("--json", action="store_true", help="one JSON object: index_version and matches")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="lookalike", description=__doc__)
    p.add_argument("--address", default=os.environ.get("LOOKALIKE_ADDRESS", "127.0.0.1:50051"),
                   help="server host:port (env LOOKALIKE_ADDRESS)")
    p.add_argument("--timeout-s", type=float, default=float(os.environ.get("LOOKALIKE_TIMEOUT_S", 10)),
                   help="deadline of each call")
    p.add_argument("--root-ca", type=Path, default=os.environ.get("LOOKALIKE_ROOT_CA"),
                   help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--client-cert", type=Path, default=os.environ.get("LOOKALIKE_CLIENT_CERT"),
                   help="client certificate for mTLS")
    p.add_argument("--client-key", type=Path, default=os.environ.get("LOOKALIKE_CLIENT_KEY"),
                   help="client key for mTLS")
    commands = p.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="what is served: model, index, versions")
    info.add_argument("--json", action="store_true")
    commands.add_parser("health", help="grpc.health.v1 status; exit 0 only when SERVING")
    embed = commands.add_parser("embed", help="print the vectors of image files")
    embed.add_argument("images", nargs="+", type=Path)
    embed.add_argument("--json", action="store_true", help="full vectors as JSON")
    _add_region(embed, "every image")
    similar = commands.add_parser("similar", help="the catalogue products nearest to an image, a catalogue "
                                                  "image, a product or a vector")
    query = similar.add_mutually_exclusive_group(required=True)
    query.add_argument("image", nargs="?", type=Path, help="a query image file")
    query.add_argument("--image-id", help="a catalogue image id (ABO image_id)")
    query.add_argument("--product", help="a catalogue product id (ABO item_id): all its images form the query")
    query.add_argument("--item", dest="image_id", help=argparse.SUPPRESS)  # the 0.1 name of --image-id
    query.add_argument("--vector", help="a JSON list of floats")
    own = similar.add_mutually_exclusive_group()
    own.add_argument("--include-query", dest="exclude_query", action="store_const", const=False,
                     help="keep the query's own product in the results (default: the server's, which leaves it "
                          "out of an --image-id or --product query and keeps it for a photo or vector)")
    own.add_argument("--exclude-query", dest="exclude_query", action="store_const", const=True,
                     help="leave the query's own product out, also for a photo or vector matching a catalogue image")
    _add_region(similar, "the query image")
    similar.add_argument("--query-expansion", type=_query_expansion, metavar="ALPHA[,RESULTS]|default",
                         help="photo or vector queries: search again with the query averaged with its RESULTS most "
                              "similar products weighted by score^ALPHA (alpha 0..10, results 1..50; an empty one or "
                              "'default': the server's)")
    _add_result_options(similar)
    recommend = commands.add_parser("recommend", help="products like the positive examples and unlike the negative "
                                                      "ones")
    recommend.add_argument("--positive", action="append", default=[], metavar="PRODUCT_ID",
                           help="a product to recommend like (repeatable)")
    recommend.add_argument("--negative", action="append", default=[], metavar="PRODUCT_ID",
                           help="a product to recommend unlike (repeatable)")
    recommend.add_argument("--positive-image", action="append", default=[], type=Path, metavar="PATH",
                           help="an image file to recommend like (repeatable)")
    recommend.add_argument("--negative-image", action="append", default=[], type=Path, metavar="PATH",
                           help="an image file to recommend unlike (repeatable)")
    recommend.add_argument("--strategy", choices=sorted(STRATEGIES), default="average_vector")
    recommend.add_argument("--ignore-missing", action="store_true",
                           help="leave out example ids the server does not hold instead of failing")
    _add_region(recommend, "every --positive-image and --negative-image")
    _add_result_options(recommend)
    bench = commands.add_parser("bench", help="load generator (closed or open loop) against --address")
    bench.add_argument("--catalogue", type=Path, required=True, help="catalogue root to draw queries from")
    bench.add_argument("--mode", choices=["closed", "open"], default="closed")
    bench.add_argument("--concurrency", type=int, default=8, help="closed loop: concurrent callers")
    bench.add_argument("--rate", type=float, default=50.0, help="open loop: mean arrivals per second (Poisson)")
    bench.add_argument("--duration-s", type=float, default=None, help="run for this long (default 10 s)")
    bench.add_argument("--requests", type=int, default=None, help="or stop after this many requests")
    bench.add_argument("--mix", default="embed=1,image=1,id=1",
                       help="weights of embed, image (FindSimilar by image), id (by image id), product (by product "
                            "id), recommend (Recommend from --examples products), info (GetInfo)")
    bench.add_argument("--images-per-embed", type=int, default=1)
    bench.add_argument("--examples", type=int, default=3, help="positive product examples per Recommend call")
    bench.add_argument("-k", type=int, default=10)
    bench.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    bench.add_argument("--no-progress", action="store_true")
    return p


def _labels(catalogue: Path | None) -> dict[str, str]:
    if catalogue is None or not (catalogue / "labels.csv").is_file():
        return {}
    with open(catalogue / "labels.csv") as handle:
        return {row["image_id"]: row["label_name"] for row in csv.DictReader(handle)}


def _result_options(args) -> dict:
    return {"k": args.k, "group_size": args.group_size, "with_attributes": args.with_attributes,
            "filters": args.filters, "exclude_products": args.exclude_products,
            "score_threshold": args.score_threshold, "diversity": args.diversity, "candidates": args.candidates}


def _show(client: ImageSimilarityClient, args, matches) -> int:
    """The same output for similar and recommend: a table or one JSON object, and the sheet."""
    if args.json:
        out = {"index_version": matches.version, "matches": [m.to_dict() for m in matches]}
        if matches.missing_product_ids or matches.missing_image_ids:
            out["missing"] = {"product_ids": matches.missing_product_ids, "image_ids": matches.missing_image_ids}
        print(json.dumps(out, indent=2))
    else:
        _print_table(args, matches)
    if args.sheet:
        _sheet(client, args, matches)
    return 0


def _similar(client: ImageSimilarityClient, args) -> int:
    vector = json.loads(args.vector) if args.vector else None
    matches = client.find_similar(args.image, image_id=args.image_id, product_id=args.product, vector=vector,
                                  exclude_query=args.exclude_query, region=args.region,
                                  query_expansion=args.query_expansion, **_result_options(args))
    return _show(client, args, matches)


def _recommend(client: ImageSimilarityClient, args) -> int:
    if args.region is not None and not (args.positive_image or args.negative_image):
        raise ValueError("--region applies to --positive-image and --negative-image examples only")

    def images(paths: list[Path]) -> list:
        return paths if args.region is None else [Cropped(path, args.region) for path in paths]

    matches = client.recommend([*args.positive, *images(args.positive_image)],
                               [*args.negative, *images(args.negative_image)], strategy=args.strategy,
                               ignore_missing=args.ignore_missing, **_result_options(args))
    for kind, ids in (("products", matches.missing_product_ids), ("images", matches.missing_image_ids)):
        if ids and not args.json:
            print(f"left out, not in index {matches.version}: {kind} {', '.join(ids)}", file=sys.stderr)
    return _show(client, args, matches)


def _query_name(args) -> str:
    if args.command == "recommend":
        like = [*args.positive, *(p.name for p in args.positive_image)]
        unlike = [*args.negative, *(p.name for p in args.negative_image)]
        return f"{', '.join(like) or 'anything'}" + (f" and unlike {', '.join(unlike)}" if unlike else "")
    if args.product:
        return f"product {args.product}"
    if args.image_id:
        return f"image {args.image_id}"
    return str(args.image) if args.image else "vector"


def _print_table(args, matches) -> None:
    query_label = _labels(args.catalogue).get(getattr(args, "image_id", None) or "", "")
    print(f"products like {_query_name(args)}{f' ({query_label})' if query_label else ''} "
          f"from index {matches.version}:")
    print(f"{'#':>3}  {'product':<20}{'image':<22}{'class':<14}{'score':>8}{'distance':>10}  path")
    for rank, match in enumerate(matches, 1):
        print(f"{rank:>3}  {match.product_id or '-':<20}{match.image_id:<22}{match.label or '-':<14}"
              f"{match.score:>8.3f}{match.distance:>10.4f}  {match.path}")
        for image in match.images[1:]:
            print(f"{'':>25}{image.image_id:<22}{image.role:<14}{image.score:>8.3f}{image.distance:>10.4f}  "
                  f"{image.path}")
        if match.attributes:
            print(f"{'':>5}" + ", ".join(f"{key}={value}" for key, value in sorted(match.attributes.items())))


def _sheet(client: ImageSimilarityClient, args, matches) -> None:
    """One tile for the query, then one per product: its best-matching image."""
    from client.sheet import contact_sheet, open_image

    small = args.catalogue / "small" if args.catalogue else None
    if args.command == "recommend":
        first = args.positive_image[:1]
        query_image, caption = (open_image(first[0]) if first else None), ["recommended for", _query_name(args)]
    elif args.image:
        query_image, caption = open_image(args.image), ["query", args.image.name]
    else:
        own = (client.find_similar(image_id=args.image_id, product_id=args.product, k=1, exclude_query=False)
               if args.image_id or args.product else [])
        path = small / own[0].path if own and small is not None else None
        query_image = open_image(path)
        caption = ["query", _query_name(args), own[0].label if own else ""]
    neighbours = [(small / m.path if small else None, [m.product_id or m.image_id, m.label, f"score {m.score:.3f}"])
                  for m in matches]
    # The region outlined on the query's tile: on a photo query, or on a recommendation's first image.
    region = args.region if (args.command == "recommend" and args.positive_image) or (
        args.command == "similar" and args.image) else None
    out = contact_sheet(query_image, caption, neighbours, args.sheet, query_region=region)
    print(f"contact sheet: {out.resolve()}")


def _bench(args) -> int:
    from client.loadgen import LoadConfig, format_report, parse_mix, run_load

    duration = args.duration_s if args.duration_s is not None else (None if args.requests else 10.0)
    config = LoadConfig(address=args.address, catalogue=args.catalogue, mode=args.mode,
                        concurrency=args.concurrency, rate=args.rate, duration_s=duration, requests=args.requests,
                        mix=parse_mix(args.mix), images_per_embed=args.images_per_embed, examples=args.examples,
                        k=args.k, timeout_s=args.timeout_s, progress=not args.no_progress)
    report = asyncio.run(run_load(config))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _info_text(info: dict) -> str:
    """One line a field; the attributes one line each, with their kind and, for a number, its range."""
    lines = [f"{key:<24}{value}" for key, value in info.items() if key not in ("attributes", "attribute_keys")]
    for position, attribute in enumerate(info["attributes"]):
        bounds = f" {attribute['min']:g}..{attribute['max']:g}" if "min" in attribute else ""
        lines.append(f"{'attributes' if position == 0 else '':<24}{attribute['key']} ({attribute['kind']}{bounds}, "
                     f"{attribute['product_count']} products)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        client = ImageSimilarityClient(args.address, timeout_s=args.timeout_s, root_ca=args.root_ca,
                                       client_cert=args.client_cert, client_key=args.client_key)
        with client:
            if args.command == "info":
                info = client.info()
                print(json.dumps(info, indent=2) if args.json else _info_text(info))
            elif args.command == "health":
                status = client.health()
                print(status)
                return 0 if status == "SERVING" else 1
            elif args.command == "embed":
                vectors = client.embed(args.images, regions=None if args.region is None else
                                       [args.region] * len(args.images))
                for path, vector in zip(args.images, vectors, strict=True):
                    print(json.dumps({"image": str(path), "vector": vector.tolist()}) if args.json else
                          f"{path}: {len(vector)}-d [{', '.join(f'{v:.4f}' for v in vector[:4])}, ...]")
            elif args.command == "recommend":
                return _recommend(client, args)
            else:
                return _similar(client, args)
        return 0
    except (LookalikeError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"lookalike: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
