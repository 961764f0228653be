"""Writes BENCHMARKS.md and its plots from a full run's results (and the reliability figures, when present)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
PLOTS = HERE / "plots"


RELIABILITY_BEGIN = "<!-- reliability section: written by make soak (bench/report.py write_reliability_section) -->"
RELIABILITY_END = "<!-- end of the reliability section -->"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _plots(results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    out = {}
    sets = results["quality"]["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, (name, found) in zip(axes[0], sets.items(), strict=True):
        rows = found["rows"]
        colours = ["tab:green" if r is found["default"] or r == found["default"] else
                   "tab:orange" if r["supervised"] else "tab:blue" if r["buildable"] else "lightgrey" for r in rows]
        ax.bar(range(len(rows)), [r["precision_at_10"] for r in rows], color=colours)
        ax.axhline(found["raw_pixel_floor"]["precision_at_10"], color="grey", linestyle="--", label="raw pixels")
        labels = [f"{r['backbone'].replace('efficientnet_', '')} {r['pooling']}{'+m' if r['mirror'] else ''} "
                  f"{r['head']}" for r in rows]
        ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=6)
        ax.set_title(f"{name}: green default, orange supervised, grey measured only", fontsize=8)
        ax.set_ylabel("precision@10")
        low = min(min(r["precision_at_10"] for r in rows), found["raw_pixel_floor"]["precision_at_10"])
        ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["precision_at_10"] for r in rows) + 0.03))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOTS / "quality.png", dpi=110)
    out["quality"] = "bench/plots/quality.png"
    plt.close(fig)
    embed = results["server"]["embed"]
    concurrencies = results["config"]["concurrencies"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, colour in (("batching", "tab:green"), ("no_batching", "tab:red")):
        ax.plot(concurrencies, [embed[f"{label}@{c}"]["qps"] for c in concurrencies], "o-", color=colour,
                label=label.replace("_", " "))
    ax.axhline(results["in_process"]["limit_images_per_s"], color="black", linestyle="--", label="in-process limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("Embed images/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "serving.png", dpi=110)
    out["serving"] = "bench/plots/serving.png"
    plt.close(fig)
    return out


def _workers(results: dict) -> list[str]:
    found = results.get("workers")
    if not found:
        return []
    rows = []
    for count, row in found["by_workers"].items():
        for name, label in (("info", "GetInfo, closed loop"), ("product", "by product, closed loop"),
                            ("product_open_50", "by product, open loop at 50%"),
                            ("product_open_80", "by product, open loop at 80%"), ("embed", "Embed, closed loop")):
            stats = row[name]
            rate = f" ({stats['rate']}/s offered)" if "rate" in stats else ""
            rows.append([count, label + rate, stats["qps"], stats.get("p50_ms"), stats.get("p99_ms"),
                         ", ".join(f"{k} {v}" for k, v in sorted(stats["codes"].items()))])
    return ["## One port, N workers", "",
            f"`lookalike-serve --workers N` under the compiled Go load generator (`lookalike-loadgen`, 8 "
            f"connections, closed loop at concurrency 16; {found['duration_s']:.0f} s per point, on the same 2 "
            "cores as the server). Default settings, so by-product calls for the 256 products the load draws "
            "from are mostly answered by the result cache (a product page asks the same question many times); "
            "the uncached search is in the table above. Open loop: Poisson arrivals at a share of that worker "
            f"count's closed-loop by-product maximum. The in-process Embed limit is "
            f"{found['embed_in_process_limit']} images/s.", "",
            _table(["workers", "load", "QPS", "p50 ms", "p99 ms", "codes"], rows), ""]


def _quality(quality: dict) -> list[str]:
    from bench.quality import describe

    out = ["## Retrieval quality", "",
           "Exact search on unit vectors, so this measures the embedding, not the index. precision@10: share of "
           "the 10 nearest catalogue images with the query's label; mAP@10: mean average precision at 10. Every "
           "learned head is fitted on the catalogue alone; no query is ever in the catalogue. images/s: the "
           "exported model (trunk + head) in-process at batch 8 on preprocessed images; index MB: Annoy, 10 trees, "
           "for the catalogue. Heads: pca, lda (product types blended with look, weight 0.7) and metric (trained "
           "with a proxy loss, stopped on a held-out tenth of the catalogue) are build options; pca-whiten and lda "
           "(types - 1) are measured levers a build does not offer. `+ augment N`: --augment-neighbours N, the "
           "catalogue's vectors augmented and the queries' not (it costs nothing at query time). head fit s: "
           "fitting the head and projecting every vector (and augmenting), on this shared host. "
           "`+ query expansion A, R`: FindSimilar's query_expansion (a request's option, for photo and vector "
           "queries), each query averaged with its R nearest catalogue images weighted by score^A, then searched "
           "again; query ms: the median time of an exact top-10 search of the catalogue, one query at a time "
           "(with expansion, both searches).", ""]
    for name, found in quality["sets"].items():
        floor = found["raw_pixel_floor"]
        out += [f"### {name}", "",
                f"{found['catalogue_size']} catalogue images, {found['query_count']} queries, "
                f"{len(found['labels'])} labels ({found['source']}). Raw pixels (32x32, colour): precision@10 "
                f"{floor['precision_at_10']}, mAP@10 {floor['map_at_10']}."]
        for reason, dropped in found.get("dropped", {}).items():
            out += [f"Dropped as a build drops them: {dropped['count']} images {reason}, e.g. "
                    f"`{dropped['examples'][0]}`."]
        out += ["", _table(["backbone", "pooling", "mirror", "head", "dim", "precision@10", "mAP@10", "images/s",
                            "index MB", "head fit s", "query ms"],
                           [[r["backbone"], r["pooling"], "yes" if r["mirror"] else "no", r["head"], r["dimension"],
                             r["precision_at_10"], r["map_at_10"], r["images_per_s"], r["index_mb"], r.get("fit_s"),
                             r.get("query_ms")]
                            for r in found["rows"]]), ""]
        for label, row in (("Default build", found.get("default")), ("Best unsupervised", found["best_unsupervised"]),
                           ("Best with product types", found["best_supervised"])):
            if row is not None:
                rate = "" if row["images_per_s"] is None else f", {row['images_per_s']} images/s"
                out.append(f"- {label}: **{describe(row)}**, precision@10 {row['precision_at_10']}, mAP@10 "
                           f"{row['map_at_10']}{rate}.")
        expanded = [r for r in found["rows"] if r.get("query_expansion")]
        if expanded:
            best = max(expanded, key=lambda r: (r["precision_at_10"], r["map_at_10"]))
            plain = next(r for r in found["rows"] if (r["pooling"], r["mirror"], r["head"]) ==
                         (best["pooling"], best["mirror"], best["head"].split(" + ")[0]) and r["backbone"] ==
                         best["backbone"])
            out.append(f"- Best with query expansion: **{describe(best)}**, precision@10 {best['precision_at_10']} "
                       f"against {plain['precision_at_10']} without, {best['query_ms']} ms a query against "
                       f"{plain['query_ms']}.")
        out.append("")
    return out


LEVERS_BEGIN = "<!-- levers section: written by python -m bench.quality --section (bench/report.py) -->"
LEVERS_END = "<!-- end of the levers section -->"
# A lever ladder's steps: the head alone, with database-side augmentation, with query expansion, with both.
_LEVER_STEPS = (("", False, False), (" + augment N", True, False), (" + query expansion", False, True),
                (" + augment N + query expansion", True, True))


def _lever_ladder(rows: list[dict], supervised: bool, goal: float) -> list[list]:
    """Per buildable head and lever, the best row (any pooling or backbone) and how far it got against the goal."""
    from bench.quality import BUILDABLE_HEADS, base_head, describe

    out = []
    for head in BUILDABLE_HEADS:
        for suffix, augmented, expanded in _LEVER_STEPS:
            found = [r for r in rows if r["buildable"] and r["supervised"] == supervised
                     and base_head(r["head"]) == head and (" + augment" in r["head"]) == augmented
                     and r["query_expansion"] == expanded]
            if found:
                best = max(found, key=lambda r: (r["precision_at_10"], r["map_at_10"]))
                gap = best["precision_at_10"] - goal
                out.append([head + suffix, describe(best), best["precision_at_10"], best["map_at_10"],
                            f"{gap:+.4f}" + (" (met)" if gap >= 0 else "")])
    return out


def _levers(quality: dict) -> list[str]:
    """Issue 22's levers (metric head, database-side augmentation, query expansion) at full size: every row with its
    cost, what `--head auto` picks, and per target which lever got how far."""
    from bench.quality import TARGETS, describe

    out = [LEVERS_BEGIN, "### The metric head, database-side augmentation and query expansion (issue 22)", "",
           "Results in `bench/results/quality.json`, each set's command and host load with it. Rows as in the tables "
           "above; `+ augment N + query expansion 3, 5`: the server's default expansion searching a catalogue built "
           "with --augment-neighbours N (the expansion's first search reads the stored, augmented vectors). Costs: "
           "features s is the backbone over catalogue and queries; head fit s fits the head and projects every "
           "vector (an augmented row's includes its augment s, the exact all-pairs scan of the catalogue); query ms "
           "is the median CPU time (not wall time, which on this loaded host is mostly a wait for a core) of an "
           "exact top-10 search, one query at a time (with expansion, both searches). Features and head fit s are "
           "wall times on a host shared with other work, so they rank costs roughly, no more.", ""]
    for name, found in quality["sets"].items():
        rows, default, auto = found["rows"], found.get("default"), found.get("auto_head")
        features = ", ".join(f"{backbone} {seconds} s ({(found['catalogue_size'] + found['query_count']) / seconds:.0f}"
                             " images/s)" if seconds else f"{backbone} (cached)"
                             for backbone, seconds in found.get("features_s", {}).items())
        run = found.get("run", {})
        nice = f"nice -n {run['niceness']} " if run.get("niceness") else ""
        load = run.get("load_average", ["-", "-"])
        out += [f"#### {name}, {found['catalogue_size']} / {found['query_count']}", "",
                f"`PYTHONPATH=. {nice}{run.get('command', 'python -m bench.quality')}` on {run.get('started_at')} "
                f"({run.get('cores')} cores, load average {load[0]} at the start and {load[1]} at the end, "
                f"{run.get('seconds')} s). {found['source']}. Features: {features}. Raw pixels: precision@10 "
                f"{found['raw_pixel_floor']['precision_at_10']}.", "",
                _table(["backbone", "pooling", "head", "dim", "precision@10", "mAP@10", "head fit s", "augment s",
                        "query ms"],
                       [[r["backbone"], r["pooling"] + (" + mirror" if r["mirror"] else ""), r["head"], r["dimension"],
                         r["precision_at_10"], r["map_at_10"], r.get("fit_s"), r.get("augment_s"), r.get("query_ms")]
                        for r in rows]), ""]
        if auto is not None:
            figures = ", ".join(f"{head} {value}" for head, value in auto["held_out_precision_at_10"].items())
            out.append(f"- `--head auto` (the default build's head, with product types) picks **{auto['chosen']}**: "
                       f"held-out precision@10 {figures} on {auto['held_out_queries']} held-out catalogue images "
                       f"(metric must lead by more than {auto['margin']}; {auto['metric_epochs']} epochs; "
                       f"{auto['seconds']} s for both fits).")
        if default is not None:
            rate = "" if default["images_per_s"] is None else f", its model {default['images_per_s']} images/s"
            out.append(f"- Default build: **{describe(default)}**, precision@10 {default['precision_at_10']}, "
                       f"mAP@10 {default['map_at_10']}{rate} (no augmentation, no query expansion: both off by "
                       "default).")
        for target, goal in TARGETS.get(name, {}).items():
            ladder = _lever_ladder(rows, target == "with product types", goal)
            met = any(step[-1].endswith("(met)") for step in ladder)
            out += ["", f"Target: precision@10 >= {goal} {target}: **{'met' if met else 'missed'}**. "
                    "Best row per head and lever:", "",
                    _table(["lever", "best row", "precision@10", "mAP@10", "against the target"], ladder)]
        out.append("")
    return [*out, LEVERS_END, ""]


def _levers_from_file() -> list[str]:
    found = HERE / "results" / "quality.json"
    return _levers(json.loads(found.read_text())) if found.exists() else []


def write_levers_section(quality: dict, path: Path = ROOT / "BENCHMARKS.md") -> Path:
    """Puts the levers section into BENCHMARKS.md in place of the previous one (or before the Index section),
    leaving every other figure as the last full run wrote it."""
    return put_section(path, LEVERS_BEGIN, LEVERS_END, _levers(quality), "\n## Index\n")


def _products(results: dict) -> list[str]:
    """Image results (0.1) against product results, on the built sample with products."""
    products = results.get("products")
    if not products:
        return []
    return [
        "## Products",
        "",
        f"The built sample: {products['products']} products owning {products['images']} images; "
        f"{products['queries']} queries, each from a product with several images (its main image, or the product "
        "itself). Exact search, so the figures measure what a row of 10 shows, not the index. distinct: products "
        "in the top 10; product precision@10: share of the 10 slots holding another product of the query's product "
        "type (a repeated product or the query's own is a wasted slot).",
        "",
        _table(["results", "distinct products in top 10", "product precision@10"],
               [[r["results"], r["distinct_products_in_top_10"], r["product_precision_at_10"]]
                for r in products["rows"]]),
        "",
    ]


def _filters(results: dict) -> list[str]:
    """Filtered FindSimilar at four selectivities, against Annoy then filter; the exact/Annoy crossover."""
    filters = results.get("filters")
    if not filters:
        return []
    recommend = results["server"].get("recommend", {})
    return [
        "## Filters",
        "",
        f"The built sample's {filters['products']} products ({filters['images']} images), each query a product's "
        f"main image with its own product excluded, {filters['queries']} queries per selectivity. One attribute per "
        "selectivity is added to the products table, held by exactly that share of products; the filter asks for it. "
        "recall@10 is against exact filtered search; possible is how many products pass (at most 10). The served "
        f"plans pick exact search over the matching rows up to exact_max_rows = {filters['exact_max_rows']}, else "
        "Annoy with over-fetch and an exact fallback; 'Annoy forced' runs the over-fetch path at every selectivity "
        "(exact_max_rows = 0) to show what it does where a larger catalogue would take it; naive is Annoy's 10 "
        f"nearest images at the served search_k ({filters['search_k']}) with the filter applied afterwards.",
        "",
        _table(["selectivity", "matching products", "method", "returned of 10", "possible", "recall@10", "p50 ms",
                "p99 ms", "plans"],
               [[r["selectivity"], r["matching_products"], r["method"], r["returned_of_10"], r["possible_of_10"],
                 r["recall_at_10"], r["p50_ms"], r["p99_ms"],
                 ", ".join(f"{k} {v}" for k, v in r["plans"].items()) or "-"] for r in filters["rows"]]),
        "",
        *_ranges_from_file(),
        "Where exact search stops being cheaper: exact scoring of n rows against one Annoy query fetching 30 "
        "candidates at the served search_k (ms per query, in-process):",
        "",
        _table(["rows", "exact ms", "Annoy ms"], [[c["rows"], c["exact_ms"], c["annoy_ms"]]
                                                 for c in filters["crossover"]]),
        "",
        "Recommend from 1, 3 and 10 positive product examples (average_vector, k = 10; closed loop, 2 callers):",
        "",
        _table(["examples", "QPS", "p50 ms", "p90 ms", "p99 ms", "max ms"],
               [[n, v["qps"], v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"]] for n, v in recommend.items()]),
        "",
    ]


def _living(results: dict) -> list[str]:
    """Rebuild cost, serving during a rebuild, hide to effect."""
    live = results.get("living")
    if not live:
        return []
    full, rebuild, serve, hide = live["full"], live["rebuild"], live["serving"], live["hide"]
    source = ("the committed 2,000-image sample (Debian's dataset-fashion-mnist was not installed)"
              if live["fell_back_to_committed_sample"] else "Debian's Fashion-MNIST, one image per product")
    rows = [["full build (empty cache)", live["images"], full["embedded"], "-", full["seconds"]],
            [f"rebuild: +{rebuild['added']} / -{rebuild['removed']} images", rebuild["images"], rebuild["embedded"],
             rebuild["decoded"], rebuild["seconds"]]]
    latency = [[name, v["qps"], v["p50_ms"], v["p99_ms"], v["max_ms"],
                sum(v["codes"].values()) - v["codes"].get("OK", 0)]
               for name, v in (("idle", serve["idle"]), ("during the rebuild", serve["during_rebuild"]))]
    return [
        "## A living catalogue",
        "",
        f"{live['images']} images from {source}: a full build with an empty feature cache, then a rebuild "
        f"after adding {rebuild['added']} images the model has never seen and removing {rebuild['removed']} (files, "
        "rows and listings), into "
        "the ARTIFACTS a server is serving from. Stages of the rebuild (s): "
        + ", ".join(f"{k} {v}" for k, v in rebuild["stage_seconds"].items()) + ".",
        "",
        _table(["build", "images indexed", "embedded", "files decoded", "wall s"], rows),
        "",
        f"Rebuild / full build: **{live['rebuild_over_full']}** (target <= 0.25). The server swapped to the "
        f"rebuilt version {serve['swap_after_publish_s']} s after it was published (watch interval "
        f"{live['watch_interval_s']} s). FindSimilar by image id on the old version, closed loop with 2 callers, "
        "while idle and while the (niced) rebuild runs beside it:",
        "",
        _table(["server", "QPS", "p50 ms", "p99 ms", "max ms", "failed"], latency),
        "",
        f"Hide to effect: `lookalike-build hide` of a product a query returns, under closed-loop load, until the "
        f"query stops returning it: mean {hide['mean_s']} s, max {hide['max_s']} s over {hide['rounds']} rounds; "
        f"{hide['failed_requests']} failed of {hide['requests_under_load']} requests under load.",
        "",
    ]


SCALE_BEGIN = "<!-- scale section: written by make bench-scale (bench/report.py write_scale_section) -->"
SCALE_END = "<!-- end of the scale section -->"


def _runs(commands: list[str]) -> list[str]:
    """Each command once, with how many times it ran in a row (a part measured again keeps its last figures)."""
    runs = [[command, sum(1 for _ in group)] for command, group in itertools.groupby(commands)]
    return [f"`{command}`" + (f" ({times} times; the last run's figures)" if times > 1 else "")
            for command, times in runs]


def _scale(scale: dict) -> list[str]:
    """The ABO-size section from `make bench-scale`'s results (bench/results/scale.json)."""
    abo, lists, serving = scale["abo"], scale.get("lists", {}), scale["serving"]
    per = abo["images_per_product"]
    out = [SCALE_BEGIN, "## At ABO's size", "",
           "Generated by " + " then ".join(_runs(scale.get("commands", ["make bench-scale"])))
           + f" from {scale['started_at']} ({scale['machine']['cores']} cores shared with other work, so every "
           f"speed figure is noisy); the recorded runs took {scale['seconds']:.0f} s. Raw figures: "
           "`bench/results/scale.json`.", "",
           _table(["target", "measured", "goal", "met"],
                  [[t["target"], t["measured"], t["goal"], "yes" if t["met"] else "**no**"] for t in scale["targets"]]),
           "",
           f"**The version of ABO's shape** (`bench/scale.py`, nothing embedded): {abo['products']:,} products owning "
           f"{abo['images']:,} images ({per['distribution']}: mean {per['mean']}, at most {per['max']}; share of "
           "products by image count " + ", ".join(f"{k}: {v}" for k, v in per["share_by_count"].items()) + "), "
           f"{abo['product_types']['count']} product types ({abo['product_types']['distribution']}: the largest "
           f"holds {abo['product_types']['largest_share']:.1%} of the products), attributes "
           + ", ".join(abo["attribute_keys"]) + ". Its tables are written by the builder's own `write_tables` from "
           "the builder's `assemble`, its Annoy index by `build_with_recall`, its SavedModel and model manifest "
           "copied from the demo build. Vectors have the lda head's layout (type axes, then look axes, each part "
           "unit-normalised, cosine = 0.7 x type + 0.3 x look): a type centroid plus product and view offsets in "
           "the type axes; in the look axes a product look with a power-law spectrum like PCA axes of real "
           "features, partly shared by its type, plus a view offset, so views of one product sit near each other. "
           "The same generator at the demo's shape beside the demo's real vectors, and at ABO's shape (search_k: "
           "the builder's rule, the smallest reaching recall@10 0.95 with 10 trees):", "",
           _table(["vectors", "products", "images", "types", "cos views of a product", "cos same type",
                   "cos other types", "nearest other product (median)", "effective dim", "search_k", "recall@10"],
                  [[name, r["products"], r["images"], r["types"], r["views_of_one_product"],
                    r["products_of_one_type"], r["different_types"], r["nearest_other_product_median"],
                    r["effective_dimension"], r["search_k"], r["recall_at_10"]]
                   for name, r in (scale.get("realism") or {}).items()]), ""]
    section = lists.get("section") or {}
    recall = lists.get("recall", {})
    if "overrun" in lists:
        out += [f"**Neighbour lists**: `lookalike-build reindex --neighbours 100` did not finish within its budget "
                f"of {lists['budget_s']} s and was stopped ({lists['overrun']}); the ABO version was served without "
                "lists, so its by-id figures below are searches.", ""]
    elif "seconds" not in lists:
        progress = scale.get("reindex_progress") or {}
        out += [f"**Neighbour lists**: `lookalike-build reindex --neighbours 100` on that version (index stage "
                f"{progress.get('stages_done_s', {}).get('index')} s) had done {progress.get('tasks_done')} of its "
                f"{progress.get('tasks')} list tasks after {progress.get('neighbours_stage_s_so_far')} s of its "
                f"neighbours stage when the serving figures were taken: about "
                f"{progress.get('neighbours_stage_s_at_this_rate')} s for the stage at that rate on this shared host "
                f"(embedding {abo['images']:,} images at {scale['embedding_images_per_s']} images/s: "
                f"{abo['images'] / scale['embedding_images_per_s']:,.0f} s).", ""]
    else:
        how = (f"by {lists['seconds_from']}" if "seconds_from" in lists
               else "end to end, Spark start-up included")
        out += [f"**Neighbour lists**: `lookalike-build reindex --neighbours 100 --nice 0` on that version took "
                f"**{lists['seconds']} s** ({how}; stages: "
                + ", ".join(f"{k} {v}" for k, v in (lists.get("stage_seconds") or {}).items())
                + f"); embedding {abo['images']:,} images at {scale['embedding_images_per_s']} images/s would take "
                f"{abo['images'] / scale['embedding_images_per_s']:,.0f} s. recall@10 of the stored lists against a "
                f"dense brute-force scan: products {recall.get('product_recall_at_10')}, images "
                f"{recall.get('image_recall_at_10')} ({recall.get('product_queries')} queries each); the manifest's "
                f"own figure: {section.get('recall_at_10', '-')}." + (f" {lists['note']}." if "note" in lists else ""),
                ""]
    build = scale.get("build")
    errors = scale.get("errors", {})
    if "build" in errors:
        out += [f"**A real `lookalike-build build`** of {scale['config']['build_products']:,} products from cached "
                f"features did not complete: {errors['build']}.", ""]
    elif build:
        first, again = build["first"], build["plus_1pct"]
        rows = [[name, b["products"], b["images"], b["embedded"], b["from_cache"], b["decoded"], b["seconds"],
                 ", ".join(f"{k} {v}" for k, v in b["stage_seconds"].items())]
                for name, b in (("first build, every feature cached", first),
                                (f"rebuild after +{again['added_products']} products "
                                 f"(+{again['added_images']} images)", again))]
        factor = scale["abo"]["images"] / max(first["images"], 1)
        out += ["**A real `lookalike-build build`** (`--neighbours 100 --nice 0`) of a catalogue in ABO's layout "
                "(files, images.csv.gz, listings) holding the first products of that shape, every file's scan and "
                "features put in the feature cache beforehand through `builder.cache` (content sha256 under the "
                "default model's key), so the first build embeds nothing, as a daily rebuild of an unchanged "
                "catalogue would; the rebuild adds 1% products whose images the model embeds for real:", "",
                _table(["build", "products", "images", "embedded", "from cache", "files decoded", "wall s",
                        "stages (s)"], rows), "",
                *_build_at_abo(scale, first, again, factor), ""]
    demo, abo_row = serving["demo"] or {"memory": {}}, serving["abo"]
    labels = (("info", "GetInfo (ceiling)"), ("info_open_50", "GetInfo, open 50%"),
              ("info_at_product_50", "GetInfo at by product's open 50% rate"), ("product", "by product id"),
              ("product_open_50", "by product, open 50%"), ("product_open_80", "by product, open 80%"),
              ("id", "by image id"), ("id_open_50", "by image id, open 50%"), ("id_open_80", "by image id, open 80%"),
              ("image", "photo"))
    rows = []
    for key, label in labels:
        if key in demo or key in abo_row:
            d, a = demo.get(key, {}), abo_row.get(key, {})
            rows.append([label, d.get("qps"), d.get("p50_ms"), d.get("p99_ms"), a.get("qps"), a.get("p50_ms"),
                         a.get("p99_ms")])
    out += [f"**Serving**, both versions in one run, result cache off, compiled load generator (closed loop: 8 "
            f"callers on 4 connections, {scale['config']['duration_s']:.0f} s a point; open loop: Poisson arrivals "
            "at a share of the closed-loop maximum), on the same 2 cores as the server. The GetInfo open-loop rows "
            "are the RPC stack's own tail on this host (a 14 us handler, at half its maximum and at by product's "
            "half rate): an open-loop p99 by product cannot go below them. Demo: "
            f"{demo.get('ready_s')} s to SERVING, RSS {demo['memory'].get('rss_mb')} MB; ABO shape: "
            f"{abo_row['ready_s']} s, RSS {abo_row['memory']['rss_mb']} MB "
            f"({abo_row['memory_after_load']['rss_mb']} MB after the load). "
            f"Plans counted: demo {_counts(demo.get('plans'))}, ABO shape {_counts(abo_row.get('plans'))}."
            + _query_lists_note(scale), "",
            _table(["call", "demo QPS", "demo p50 ms", "demo p99 ms", "ABO QPS", "ABO p50 ms", "ABO p99 ms"], rows),
            ""]
    workers = serving.get("workers")
    if workers:
        rows = [[name, count, w["ready_s"], w["processes"], w["rss_mb"], w["pss_mb"]]
                for name, by_count in workers.items() for count, w in sorted(by_count.items())]
        out += ["Ready time and memory by worker count after a short by-id load (RSS counts shared pages in every "
                "process, PSS once; with 2 workers a supervisor is a third process). The demo's figures are the "
                "model's and runtime's share, so what the ABO catalogue itself adds per worker is the ABO "
                "difference less the demo's:", "",
                _table(["version", "workers", "ready s", "processes", "RSS MB", "PSS MB"], rows), ""]
    out += _memory_from_file()
    swap = serving.get("swap")
    if swap:
        rows = [[name.replace("_", " "), v.get("calls"), v.get("p50_ms"), v.get("p99_ms"), v.get("max_ms")]
                for name, v in swap.items() if isinstance(v, dict) and "calls" in v]
        out += [f"**Swap pause**: CURRENT alternated {swap['swaps']} times between the ABO version with lists and "
                "without (each load took " + ", ".join(f"{s} s" for s in swap["load_to_swap_s"]) + " from CURRENT "
                "to the first answer from the new version) under by-product load (2 callers), a probe calling "
                "GetInfo every 2 ms; at swap is within 100 ms of the first answer from the new version. "
                f"Failed probes: {swap['errors']}. The server's own count of the full collections that freed a "
                f"retired version: {_counts(swap.get('retire_collections'))}.", "",
                _table(["GetInfo probe", "calls", "p50 ms", "p99 ms", "max ms"], rows), ""]
    holds = serving.get("swap_holds")
    if holds:
        rows = [[step, holds[step]["max_ms"], ", ".join(f"{v:g}" for v in holds[step]["each_ms"])]
                for step in ("load", "unload", "free")]
        out += ["**The swap's own pauses** (`interpreter_holds`): the three costliest steps of a swap that run off the "
                "event loop, in one process (heap frozen as the server's), each on a thread while a ticker thread "
                "(0.2 ms sleeps) stands in for the loop: loading the next version beside the served one (sharing its "
                "model), unloading the retired one, dropping its last reference. Not measured here: the delta feed's "
                "read and the hidden products' masks (no deltas, nothing hidden in this run). The longest the ticker "
                "waited is the longest the interpreter was held (the host's own stalls count too); the GetInfo probe "
                "above adds the RPC stack and the load generator sharing the two cores:", "",
                _table(["step", "max ms", "each swap, ms"], rows), ""]
    if errors:
        out += ["Parts that failed in this run: " + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ".", ""]
    return [*out, SCALE_END]


def _counts(found: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (found or {}).items()) or "-"


def _build_at_abo(scale: dict, first: dict, again: dict, factor: float) -> list[str]:
    """The daily rebuild at ABO's size from the measured stages: those that read the catalogue scale linearly, the
    model's exports do not grow, index and lists are taken from the ABO-size version above."""
    progress = scale.get("reindex_progress") or {}
    lists = scale.get("lists", {}).get("stage_seconds", {}).get("neighbours") or progress.get(
        "neighbours_stage_s_at_this_rate")
    index = scale["abo"].get("write_seconds", {}).get("index")
    if not lists or not index:
        return [f"At ABO's size ({factor:.1f}x these images), linearly: a first build about "
                f"{first['seconds'] * factor:,.0f} s."]
    parts = {}
    for name, build in (("first", first), ("again", again)):
        stages = build["stage_seconds"]
        linear = sum(stages.get(key, 0) for key in ("scan_filter", "catalogue")) * factor
        fixed = sum(stages.get(key, 0) for key in ("trunk_export", "head_export"))
        embed = (scale["abo"]["images"] // 100) / scale["embedding_images_per_s"] if name == "again" else 0
        parts[name] = (linear, fixed, embed, linear + fixed + embed + index + lists)
    first_total, again_total = parts["first"][3], parts["again"][3]
    return [f"At ABO's size ({factor:.1f}x these images), stage by stage: scan and catalogue linearly "
            f"({parts['first'][0]:,.0f} s, an upper bound: it scales Spark's start-up too), the trunk and head "
            f"exports as measured ({parts['first'][1]:,.0f} s; the head's fit grows with the catalogue but is a "
            "small part of it here), the index as measured on the ABO "
            f"version ({index:,.0f} s) and the lists at the reindex's rate ({lists:,.0f} s): a first build from "
            f"cached features about **{first_total:,.0f} s**, a rebuild after +1% products (about "
            f"{scale['abo']['images'] // 100:,} images embedded at {scale['embedding_images_per_s']} images/s) about "
            f"**{again_total:,.0f} s**; the lists are recomputed whole, so they dominate both. They must be: a build "
            "refits its head (lda or pca) on the whole catalogue, so every vector moves a little and any list may "
            "change; only a rebuild that kept the served head could patch just the lists near what changed. "
            "The kernel is a plain blocked scan (about 2 ms of one core per query against 395,039 rows, 70% of it "
            "the matrix product): exact pruning by spherical clusters (a query skips a cluster whose angular "
            "bound is below its 100th product) gave identical lists but only 1.2x on these vectors, their "
            "effective dimension (about 21) leaving bounds loose, so it was not kept. Not measured here: "
            "reading 395,039 cached 1,280-d features and fitting the lda head in float64 hold several GB at once."]


def _query_lists_note(scale: dict) -> str:
    found = scale.get("query_lists")
    if not found or scale["serving"].get("served_version") != found["version"]:
        return ""
    return (f" The ABO version served here has exact lists (the library's kernel, as reindex runs it) for exactly "
            f"the {found['products_listed']} products and {found['images_listed']} images the load generator draws "
            f"from, the other rows empty, the files at full size (computed in {found['seconds']} s): every query of "
            "the load is answered from a list as with full lists, while the full reindex could not finish in the "
            "time this shared host allowed.")


def write_scale_section(scale: dict, path: Path = ROOT / "BENCHMARKS.md") -> Path:
    """Puts the scale section into BENCHMARKS.md in place of the previous one (or before the Builder section),
    leaving every other figure as the last full run wrote it."""
    return put_section(path, SCALE_BEGIN, SCALE_END, _scale(scale), "\n## Builder\n")


def put_section(path: Path, begin: str, end: str, lines: list[str], anchor: str) -> Path:
    """Puts a section that starts with the line `begin` and ends with `end` into BENCHMARKS.md in place of the
    previous one, or else before `anchor`, or else at the end; the rest stays as the last full run wrote it."""
    text = path.read_text() if path.exists() else "# lookalike benchmarks\n"
    section = "\n".join(lines).rstrip("\n")
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    elif anchor in text:
        before, after = text.split(anchor, 1)
        text = before + "\n" + section + "\n" + anchor + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def _memory_rows(memory: dict) -> list[list[str]]:
    """The server's memory (bench/rss.py's summary), total, anonymous and file-backed split into ARTIFACTS and
    the rest: at the start, just after the warm-up and at the end, the most, the growth and the trend."""
    if not memory:
        return []

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    def row(name: str, label: str) -> list[list[str]]:
        f = memory.get(name)
        if not f:
            return []
        growth = "-" if f["growth_after_warmup_pct"] is None else f"{f['growth_after_warmup_pct']:+.1f}%"
        trend = "-" if f["trend_mib_per_10min"] is None else f"{f['trend_mib_per_10min']:+.1f}"
        return [[label, f"{mib(f['first'])}, {mib(f['warm'])}, {mib(f['last'])}, {mib(f['max'])} ({growth}; {trend})"]]

    window = f"{memory['window_s'] / 60:g} minutes"
    head = (f"server memory, MiB: the first sample, the median of the {window} after the warm-up (the first "
            f"{memory['warmup_s'] / 60:g} minutes), the median of the last {window}, max (growth from the one median "
            "to the other; trend after the warm-up, MiB per 10 minutes): total RSS")
    rows = [*row("rss", head), *row("anon", "anonymous: Python objects, the result cache, allocator arenas"),
            *row("result_cache", "of which the result cache (its own count of its answers' bytes)"),
            *row("file", "file-backed"), *row("file_other", "of which libraries (TensorFlow and the rest)"),
            *row("file_artifacts", "of which ARTIFACTS' mapped files")]
    if "file_artifacts_mapped" in memory:
        rows.append(["size of the ARTIFACTS files mapped, MiB: max", mib(memory["file_artifacts_mapped"]["max"])])
    return rows


def _chaos(chaos: dict) -> list[str]:
    hostile = chaos.get("hostile", {})
    rows = [
        ["requests (OK, each checked against the version and availability it names)",
         f"{chaos['requests']:,} ({chaos['ok']:,}, {chaos['answers_checked']:,} checked)"],
        ["wrong answers / unexpected errors / availability going back", f"{chaos['wrong_answers']} / "
         f"{chaos['unexpected_errors']} / {chaos['availability_went_back']}"],
        ["crashes (server exit code)", f"{chaos['crashes']} ({chaos['server_exit_code']})"],
        ["cancelled mid-flight", f"{chaos['cancelled_mid_flight']:,}"],
        ["answers by code", ", ".join(f"{code} {n:,}" for code, n in chaos["codes"].items())],
        ["CURRENT written / swaps applied / reloads refused", f"{chaos['swaps_written']:,} / {chaos['swaps_applied']:,}"
         f" / {chaos['reloads_refused']}"],
        ["SIGHUPs / availability changes", f"{chaos['sighups']:,} / {chaos['availability_changes']:,}"],
        ["products hidden / shown again", f"{chaos['products_hidden']:,} / {chaos['products_shown']:,}"],
        ["hostile requests (kinds): refused clearly / unclear",
         f"{hostile.get('requests', 0):,} ({hostile.get('kinds', 0)}): "
         f"{hostile.get('requests', 0) - hostile.get('unclear', 0):,} / {hostile.get('unclear', 0)}"],
    ]
    rows += _memory_rows(chaos.get("memory_mib", {}))
    return [f"Chaos for {chaos['duration_s']:g} s ({chaos['callers']} callers with short deadlines and cancels, "
            f"{chaos['slow_callers']} slow ones; CURRENT swapped between two versions, SIGHUP, hides and unhides, "
            "oversized and hostile requests mixed in; bench/chaos.py, the test's driver):", "",
            _table(["", "figure"], rows), *_memory_note(chaos.get("memory_mib", {}))]


def _memory_note(memory: dict) -> list[str]:
    """What the rise before the warm-up's end was made of, read from the same figures."""
    if not memory or memory.get("rss", {}).get("warm") is None:
        return []

    def rise(name: str) -> str:
        f = memory.get(name)
        return "-" if not f or f["warm"] is None else f"{f['warm'] - f['first']:+,.0f}"

    return ["", f"The warm-up (the first {memory['warmup_s'] / 60:g} minutes) lets the result cache reach its byte "
            "bound and both versions be swapped in many times (a swap a second); what grows after it is not filling "
            "up. From the first sample to the median after the warm-up, MiB: total "
            f"{rise('rss')}; anonymous {rise('anon')}, of which the result cache's own count {rise('result_cache')}; "
            f"file-backed {rise('file')}, of which ARTIFACTS' mapped files {rise('file_artifacts')} and libraries "
            f"{rise('file_other')}. File-backed pages are page cache, shared by every process mapping the files and "
            "dropped by the kernel under pressure; ARTIFACTS' pages never exceed the size of the files mapped, once "
            "per mapping (a version loaded again while its retiring instance finishes maps its files twice)."]


def _reliability(rel: dict) -> list[str]:
    """The reliability section from bench/results/reliability.json (make soak, or make bench's short runs)."""
    parts = [RELIABILITY_BEGIN, "## Reliability", "",
             f"From `{rel.get('command', 'make soak')}` on {rel.get('started_at')}.", ""]
    if "chaos" in rel:
        parts += [*_chaos(rel["chaos"]), ""]
    rest = {k: v for k, v in rel.items() if k not in ("command", "started_at", "chaos")}
    if rest:
        parts += ["The other scenarios (bad input, overload, SIGTERM under load, restart after SIGKILL):", "",
                  "```json", json.dumps(rest, indent=2), "```"]
    return [*parts, RELIABILITY_END]


def write_reliability_section(rel: dict, path: Path = ROOT / "BENCHMARKS.md") -> Path:
    """Puts the reliability section (make soak's figures) into BENCHMARKS.md in place of the previous one (or
    before "Reading the figures"), leaving every other figure as the last full run wrote it."""
    return put_section(path, RELIABILITY_BEGIN, RELIABILITY_END, _reliability(rel), "\n## Reading the figures\n")


RANKING_BEGIN = "<!-- ranking section: written by python -m bench.diversity and bench.region (bench/report.py) -->"
RANKING_END = "<!-- end of the ranking section -->"


def _ranking(diversity: dict | None, region: dict | None) -> list[str]:
    """Diversity (bench/results/diversity.json) and query regions (region.json), measured apart from make bench."""
    out = [RANKING_BEGIN, "## Diversity and regions", ""]
    if diversity:
        out += [f"`python -m bench.diversity`: FindSimilar by product id (k = 10) for {diversity['queries']} products "
                f"of the bench sample ({diversity['products']} products, {diversity['images']} images), in-process "
                "through the query engine as the server answers it"
                + (" (neighbour lists first)" if diversity.get("neighbour_lists") else "")
                + ". precision@10: share of the 10 with the query's product type; similarity: mean cosine similarity "
                "of the 10 results' best images, pair by pair; candidates: the server's default, 4 x k."
                + (f" {diversity['note']}." if "note" in diversity else ""), "",
                _table(["diversity", "candidates", "precision@10 (product type)", "mean pairwise similarity",
                        "distinct product types in the 10", "p50 ms", "p99 ms"],
                       [[r["diversity"], r["candidates"], r["precision_at_10"], r["mean_pairwise_similarity"],
                         r["distinct_product_types"], r["p50_ms"], r["p99_ms"]] for r in diversity["rows"]]), ""]
    if region:
        out += [f"`python -m bench.region`: {region['pairs']} composed photos, each two main images of products of "
                "different types side by side, asked whole and by the region of each half (k = 10, the served model "
                "and engine in-process). own product: share of the images whose product is among the 10; precision@10: "
                "share of the 10 with that image's product type. Each half is one catalogue image, so a region on it "
                "finds its product by construction; the figure to read is what the whole photo returns instead.", "",
                _table(["query", "own product in the 10", "precision@10 (its product type)"],
                       [[r["query"], r["own_product_in_10"], r["precision_at_10"]] for r in region["rows"]]), ""]
    return [*out, RANKING_END, ""]


def _ranking_from_file() -> list[str]:
    found = [HERE / "results" / name for name in ("diversity.json", "region.json")]
    loaded = [json.loads(path.read_text()) if path.exists() else None for path in found]
    return _ranking(*loaded) if any(loaded) else []


def write_ranking_section(path: Path = ROOT / "BENCHMARKS.md") -> Path:
    """Puts the ranking section into BENCHMARKS.md in place of the previous one (or before "A living
    catalogue"), leaving every other figure as the last full run wrote it."""
    return put_section(path, RANKING_BEGIN, RANKING_END, _ranking_from_file(), "\n## A living catalogue\n")


def _http_from_file() -> list[str]:
    """The HTTP/JSON section bench/http.py last wrote (make bench-http), kept by a full run."""
    from bench.http import section

    found = HERE / "results" / "http.json"
    return [*section(json.loads(found.read_text())), ""] if found.exists() else []


def _fresh_from_file() -> list[str]:
    """The new-products section bench/fresh.py last wrote (make bench-fresh), kept by a full run."""
    from bench.fresh import section

    found = HERE / "results" / "fresh.json"
    return [*section(json.loads(found.read_text())), ""] if found.exists() else []


def _ranges_from_file() -> list[str]:
    """The range-filter section bench/ranges.py last wrote, kept by a full run."""
    from bench.ranges import RESULTS, section

    found = RESULTS / "ranges.json"
    return [*section(json.loads(found.read_text())), ""] if found.exists() else []


def _swap_from_file() -> list[str]:
    """The swap section bench/swap.py last wrote, kept by a full run."""
    from bench.swap import section

    found = HERE / "results" / "swap.json"
    return [*section(json.loads(found.read_text())), ""] if found.exists() else []


def _memory_from_file() -> list[str]:
    """The second worker's memory bench/memory.py last measured, kept in the scale section."""
    from bench.memory import section

    found = HERE / "results" / "memory.json"
    return section(json.loads(found.read_text())) if found.exists() else []


def _scale_from_file() -> list[str]:
    found = HERE / "results" / "scale.json"
    return [*_scale(json.loads(found.read_text())), ""] if found.exists() else []


def write_report(results: dict, path: Path = ROOT / "BENCHMARKS.md") -> Path:
    plots = _plots(results)
    q, ip, srv, b, idx = (results[k] for k in ("quality", "in_process", "server", "build", "index"))
    parts = [
        "# lookalike benchmarks",
        "",
        f"Generated by `make bench` on {results['started_at']} ({results['machine']['cores']} cores, "
        f"{results['machine']['processor']}, Python {results['machine']['python']}, no GPU); the whole run took "
        f"{results['seconds']:.0f} s. Every speed figure below comes from this one run, side by side, and the "
        "targets are ratios between them. Raw figures: `bench/results/full.json`.",
        "",
        "## Targets",
        "",
        _table(["target", "measured", "goal", "met"],
               [[t["target"], t["measured"], t["goal"], "yes" if t["met"] else "**no**"] for t in results["targets"]]),
        "",
        *_quality(q),
        f"![precision@10 by configuration]({plots['quality']})",
        "",
        *_levers_from_file(),
        "## Index",
        "",
        f"{idx['vectors']} real {idx['dimension']}-d embeddings from the build below, {idx['queries']} queries, "
        "one thread each; HNSW peers tuned (ef) to at least Annoy's recall.",
        "",
        _table(["index", "setting", "recall@10", "ms/query"],
               [[r["index"], r["setting"], r["recall_at_10"], r["ms_per_query"]] for r in idx["rows"]]),
        "",
        *_products(results),
        *_filters(results),
        *_ranking_from_file(),
        *_living(results),
        *_fresh_from_file(),
        "## Serving",
        "",
        f"In-process pipeline (decode + preprocess on a thread pool overlapping the model, no RPC): "
        f"single image {ip['single_image_latency_ms']} ms; images/s by batch size "
        + ", ".join(f"{k}: {v}" for k, v in ip["images_per_s_by_batch_size"].items())
        + f". The limit of this machine: **{ip['limit_images_per_s']} images/s** at batch {ip['best_batch_size']}.",
        "",
        "Server under `lookalike bench` closed loop, Embed of one catalogue image per request "
        f"({results['config']['duration_s']:.0f} s per point, load generator on the same 2 cores):",
        "",
        _table(["configuration", "images/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
               [[k.replace("_", " "), v["qps"], v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"]]
                for k, v in srv["embed"].items() if isinstance(v, dict)]),
        "",
        f"Mean batch size with batching on: {srv['embed'].get('batching_mean_batch_size')}.",
        "",
        f"![Embed throughput by concurrency]({plots['serving']})",
        "",
        "FindSimilar by image id and by product id under the compiled load generator (`lookalike-loadgen`, "
        "closed loop, 4 connections, k = 10 products; a product query searches with the mean of its images' "
        "vectors), with the result cache off so that every call searches:",
        "",
        _table(["query", "concurrency", "QPS", "p50 ms", "p90 ms", "p99 ms", "max ms"],
               [[query, c, v["qps"], v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"]]
                for query, key in (("image id", "find_by_id"), ("product id", "find_by_product"))
                for c, v in srv.get(key, {}).items()]),
        "",
        f"The RPC ceiling, GetInfo (no model, no index) under the same load generator at concurrency "
        f"{srv['rpc_ceiling']['concurrency']}: {srv['rpc_ceiling']['qps']} QPS, p50 {srv['rpc_ceiling']['p50_ms']} ms, "
        f"p99 {srv['rpc_ceiling']['p99_ms']} ms.",
        "",
        *_workers(results),
        *_swap_from_file(),
        *_http_from_file(),
        *_scale_from_file(),
        "## Builder",
        "",
        f"A real `lookalike-build build` with Spark local[*] on {b.get('products', '-')} sample products "
        f"({b['images']} indexed images): {b['total_seconds']} s "
        f"end to end ({b['end_to_end_images_per_s']} images/s, JVM and TensorFlow start-up included); the embedding "
        f"stage alone {b['embed_images_per_s']} images/s. Stages (s): "
        + ", ".join(f"{k} {v}" for k, v in b["stage_seconds"].items())
        + f". Index: n_trees {b['n_trees']}, search_k {b['search_k']}, recall@10 {b['recall_at_10']}.",
        "",
    ]
    reliability = HERE / "results" / "reliability.json"
    if reliability.exists():
        parts += [*_reliability(json.loads(reliability.read_text())), ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        parts += [notes.read_text().strip(), ""]
    path.write_text("\n".join(parts))
    return path
