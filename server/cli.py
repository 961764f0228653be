"""`lookalike-serve`: serve the artifact version named by ARTIFACTS/CURRENT over gRPC (and HTTP/JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from lookalike.settings import OneLineArgumentParser, env_default

# The serving modules (numpy, pandas, grpc: most of a second) are imported by the functions that need them, after
# main() has set its start-up SIGHUP handler.


class HangupsWhileStarting:
    """SIGHUP's handler from main()'s first line until the server sets its own, once serving. The signal's default
    action would end the process while it imports and loads its model; ignoring it would lose a reload asked for
    after start-up read CURRENT (with --watch-interval-s 0 the new version waited for the next SIGHUP): it is
    remembered, and the server checks CURRENT and availability once more as it starts serving."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, _signum, _frame) -> None:
        self.received = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from server.batcher import BatcherConfig
    from server.core import PRODUCT_QUERIES, CoreConfig
    from server.search import SearchConfig

    b, c = BatcherConfig(), CoreConfig()
    p = OneLineArgumentParser(prog="lookalike-serve", description=__doc__)
    p.add_argument("--artifacts", type=Path, default=env_default("artifacts", None),
                   help="ARTIFACTS folder holding versions and CURRENT (env LOOKALIKE_ARTIFACTS)")
    p.add_argument("--host", default=env_default("host", "127.0.0.1"), help="address to bind; 0.0.0.0 for all")
    p.add_argument("--port", type=int, default=env_default("port", 50051), help="gRPC port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=env_default("http_port", -1),
                   help="JSON over HTTP and the console on this port, beside gRPC (same host and TLS); 0 picks a "
                        "free one, -1 (the default) turns it off")
    p.add_argument("--catalogue", type=Path, default=env_default("catalogue", None),
                   help="catalogue root (small/ ...) that GET /v1/images/{image_id} serves from; by default the "
                        "one the build recorded in the manifest")
    p.add_argument("--metrics-port", type=int, default=env_default("metrics_port", 9095),
                   help="Prometheus /metrics port; 0 picks a free one, -1 disables")
    p.add_argument("--max-batch-size", type=int, default=env_default("max_batch_size", b.max_batch_size),
                   help="images per model call: larger = more throughput, longer waits to fill")
    p.add_argument("--max-wait-ms", type=float, default=env_default("max_wait_ms", b.max_wait_ms),
                   help="how long a batch waits for more images: latency traded for throughput")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", b.max_queue),
                   help="images admitted at once; beyond it requests get RESOURCE_EXHAUSTED at once")
    p.add_argument("--preprocess-threads", type=int, default=env_default("preprocess_threads", c.preprocess_threads),
                   help="decode/preprocess threads working while the model runs")
    p.add_argument("--max-images-per-request", type=int,
                   default=env_default("max_images_per_request", c.max_images_per_request))
    p.add_argument("--max-pixels", type=int, default=env_default("max_pixels", c.max_pixels),
                   help="decoded pixels allowed per image (decompression-bomb guard)")
    p.add_argument("--exact-max-rows", type=int, default=env_default("exact_max_rows", SearchConfig().exact_max_rows),
                   help="plan exact search when a query may return this many images or fewer (never misses; "
                        "slower than Annoy above the measured crossover)")
    p.add_argument("--product-query", choices=PRODUCT_QUERIES, default=env_default("product_query", c.product_query),
                   help="a query by product id: the mean of its images' vectors, or each image as a probe (max)")
    p.add_argument("--max-candidates", type=int, default=env_default("max_candidates", c.max_candidates),
                   help="most products diversity (MMR) may choose among, a request's `candidates` (at least max k)")
    p.add_argument("--max-diversity-work", type=int,
                   default=env_default("max_diversity_work", c.max_diversity_work),
                   help="most MMR work a request may ask for, k x candidates similarities; more is INVALID_ARGUMENT "
                        "(candidates being at least k, diversity's k is at most its square root)")
    p.add_argument("--max-expansion-results", type=int,
                   default=env_default("max_expansion_results", c.max_expansion_results),
                   help="most results a query expansion may average in (each is one more product the first search "
                        "fetches); more is INVALID_ARGUMENT")
    p.add_argument("--max-message-mb", type=int, default=env_default("max_message_mb", 64),
                   help="largest gRPC message in MiB; a batch of catalogue photos fits in the default")
    p.add_argument("--grace-s", type=float, default=env_default("grace_s", 20.0),
                   help="SIGTERM: time requests in flight get to finish")
    p.add_argument("--watch-interval-s", type=float, default=env_default("watch_interval_s", 2.0),
                   help="how often CURRENT (a new version) and availability.json (hidden products) are checked; "
                        "0 = only on SIGHUP")
    p.add_argument("--lease-ttl-s", type=float, default=env_default("lease_ttl_s", 60.0),
                   help="how long this server's lease on its mapped versions lasts unrenewed (prune respects it)")
    p.add_argument("--tls-cert", type=Path, default=env_default("tls_cert", None), help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=env_default("tls_key", None), help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=env_default("tls_client_ca", None),
                   help="CA for client certificates: set it to require mTLS")
    p.add_argument("--result-cache-size", type=int, default=env_default("result_cache_size", c.result_cache_size),
                   help="FindSimilar answers by image or product id kept per version and availability (0: off)")
    p.add_argument("--result-cache-mb", type=int, default=env_default("result_cache_mb", c.result_cache_mb),
                   help="memory the result cache may hold, in MiB (an answer of k = 1000 with groups is ~0.7 MB)")
    p.add_argument("--max-search-k-factor", type=int,
                   default=env_default("max_search_k_factor", c.max_search_k_factor),
                   help="largest search_k a request may ask for, as a multiple of the version's own (which reaches "
                        "the builder's target recall); larger only costs time")
    p.add_argument("--max-image-mb-in-flight", type=int,
                   default=env_default("max_image_mb_in_flight", c.max_image_bytes_in_flight // 2**20),
                   help="encoded image MiB admitted at once; beyond it image requests get RESOURCE_EXHAUSTED")
    p.add_argument("--max-concurrent-rpcs", type=int, default=env_default("max_concurrent_rpcs", 256),
                   help="calls handled at once per process, gRPC's and HTTP's together; beyond it calls get "
                        "RESOURCE_EXHAUSTED before their message or body is read")
    p.add_argument("--workers", type=int, default=env_default("workers", 1),
                   help="server processes on one port (SO_REUSEPORT), each with its own event loop, batcher and "
                        "model; a supervisor restarts any that dies and serves their metrics together")
    p.add_argument("--model-threads", type=int, default=env_default("model_threads", 0),
                   help="TensorFlow threads per process for the model; 0 = every core (one worker) or "
                        "cores / workers")
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=["json", "text"], default=env_default("log_format", "json"))
    p.add_argument("--log-level", default=env_default("log_level", "INFO"))
    args = p.parse_args(argv)
    if args.artifacts is None:
        p.error("--artifacts is required (or set LOOKALIKE_ARTIFACTS)")
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        p.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.workers < 1 or args.model_threads < 0:
        p.error("--workers must be at least 1 and --model-threads not negative")
    if not args.artifacts.is_dir():
        p.error(f"--artifacts {args.artifacts} is not a folder")
    if args.catalogue is not None and not args.catalogue.is_dir():
        p.error(f"--catalogue {args.catalogue} is not a folder")
    if args.http_port < -1:
        p.error("--http-port must be a port, 0 (a free one) or -1 (off)")
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            p.error(f"--{flag.replace('_', '-')} {path} is not a file")
    return args


def config_from_args(args: argparse.Namespace):
    from server.app import ServerConfig, TlsConfig
    from server.batcher import BatcherConfig
    from server.core import CoreConfig
    from server.search import SearchConfig

    batcher = BatcherConfig(args.max_batch_size, args.max_wait_ms, args.max_queue)
    core = CoreConfig(batcher=batcher, preprocess_threads=args.preprocess_threads,
                      max_images_per_request=args.max_images_per_request, max_pixels=args.max_pixels,
                      product_query=args.product_query, result_cache_size=args.result_cache_size,
                      result_cache_mb=args.result_cache_mb, max_search_k_factor=args.max_search_k_factor,
                      max_image_bytes_in_flight=args.max_image_mb_in_flight * 2**20,
                      max_candidates=args.max_candidates, max_diversity_work=args.max_diversity_work,
                      max_expansion_results=args.max_expansion_results)
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return ServerConfig(artifacts=args.artifacts, host=args.host, port=args.port, metrics_port=args.metrics_port,
                        core=core, max_message_bytes=args.max_message_mb * 1024 * 1024,
                        max_concurrent_rpcs=args.max_concurrent_rpcs, grace_s=args.grace_s,
                        watch_interval_s=args.watch_interval_s, tls=tls, lease_ttl_s=args.lease_ttl_s,
                        search=SearchConfig(exact_max_rows=args.exact_max_rows), model_threads=args.model_threads,
                        listen_after_load=args.ready_fd >= 0, ready_fd=args.ready_fd, http_port=args.http_port,
                        catalogue=args.catalogue)


def _die_with_supervisor() -> None:
    """A worker gets SIGTERM (and drains) when its supervisor dies, however it dies (Linux prctl)."""
    import ctypes

    supervisor = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor or supervisor == 1:
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    # Until serve() sets its handler, once serving, a SIGHUP (reload) is remembered (a supervisor sets its own).
    hangups = HangupsWhileStarting()
    signal.signal(signal.SIGHUP, hangups)
    signal.siginterrupt(signal.SIGHUP, False)  # as SIG_IGN was: the model's threads' system calls are not interrupted
    args = parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = config_from_args(args)
    except ValueError as error:
        logging.getLogger("lookalike-serve").error("bad configuration: %s", error)
        return 2
    if args.workers > 1:
        from server.workers import Supervisor

        try:
            supervisor = Supervisor(sys.argv[1:] if argv is None else list(argv), args.workers, args.host,
                                    args.port, args.metrics_port, args.grace_s, args.model_threads,
                                    http_port=args.http_port)
        except OSError as error:
            logging.getLogger("lookalike-serve").error("cannot bind %s:%s: %s", args.host, args.port, error)
            return 1
        return supervisor.run()
    if args.ready_fd >= 0:
        _die_with_supervisor()
    from lookalike.artifacts import ArtifactError
    from server.app import serve

    try:
        asyncio.run(serve(config, hangups))
    except ArtifactError as error:
        logging.getLogger("lookalike-serve").error("cannot serve: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
