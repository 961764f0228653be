"""Test helpers: catalogues with bad rows mixed in, free ports, and real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BANNER_IDS = ("banner-wide-1", "banner-wide-2", "banner-tall-1")
CORRUPT_ID = "corrupt-1"
UNLISTED_BANNER_ID = "banner-unlisted"
SEEN_HEALTH: list[str] = []  # health statuses seen while waiting for servers, in order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    # Builds at normal priority: no test has a server of its own that needs protecting from one (a build's
    # default niceness is 10), and on a shared machine a niced build waits behind everyone else's work.
    out.setdefault("LOOKALIKE_NICE", "0")
    return out


MISSING_IMAGE_ID = "img-missing"
GERMAN_IMAGE_ID = "german-1"
BROKEN_PRODUCT = "prod-test-broken"    # names a dropped banner, the corrupt file and a missing image
SHARED_PRODUCT = "prod-test-shared"    # names the first sample product's main image too
GERMAN_PRODUCT = "prod-test-german"    # attributes in de_DE only
EMPTY_PRODUCT = "prod-test-empty"      # names no image


def make_catalogue(out: Path, products: int) -> Path:
    """The committed sample (balanced subset, with listings) plus banners the filter must drop, a corrupt
    file, and a listings part with every problem a real catalogue has."""
    subprocess.run([BIN / "lookalike-build", "sample", "fashion-mnist", "--out", out, "--limit", str(products)],
                   check=True, env=env(), capture_output=True)
    rng = np.random.default_rng(7)
    rows = []
    for image_id, (height, width) in zip(BANNER_IDS, [(60, 400), (100, 320), (500, 120)], strict=True):
        rel = f"ba/{image_id}.png"
        (out / "small" / "ba").mkdir(exist_ok=True)
        (out / "small" / rel).write_bytes(png_bytes(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        rows.append((image_id, height, width, rel))
    good = png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (out / "small" / "cc").mkdir(exist_ok=True)
    (out / "small" / f"cc/{CORRUPT_ID}.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    rows.append((CORRUPT_ID, 64, 64, f"cc/{CORRUPT_ID}.png"))
    (out / "small" / f"cc/{GERMAN_IMAGE_ID}.png").write_bytes(good)
    rows.append((GERMAN_IMAGE_ID, 64, 64, f"cc/{GERMAN_IMAGE_ID}.png"))
    # On disk but not in images.csv.gz: its size must come from the file.
    (out / "small" / f"ba/{UNLISTED_BANNER_ID}.png").write_bytes(
        png_bytes(rng.integers(0, 255, (30, 300, 3), dtype=np.uint8)))
    with gzip.open(out / "images.csv.gz", "at", newline="") as handle:
        csv.writer(handle).writerows(rows)
    german = [{"language_tag": "de_DE", "value": "Schuh"}]
    listings = [
        {"item_id": BROKEN_PRODUCT, "main_image_id": BANNER_IDS[1], "other_image_id": [CORRUPT_ID, MISSING_IMAGE_ID],
         "product_type": [{"value": "BANNER"}]},
        {"item_id": SHARED_PRODUCT, "main_image_id": first_listing(out)["main_image_id"],
         "product_type": [{"value": "SHARED"}], "brand": [{"language_tag": "en_US", "value": "Twice"}]},
        {"item_id": GERMAN_PRODUCT, "main_image_id": GERMAN_IMAGE_ID, "item_name": german,
         "product_type": [{"value": "SHOES"}], "country": "DE"},
        {"item_id": EMPTY_PRODUCT, "product_type": [{"value": "NOTHING"}]},
    ]
    with gzip.open(out / "listings" / "metadata" / "listings_9.json.gz", "wt") as handle:
        handle.writelines(json.dumps(listing) + "\n" for listing in listings)
    return out


def first_listing(catalogue: Path) -> dict:
    with gzip.open(catalogue / "listings" / "metadata" / "listings_0.json.gz", "rt") as handle:
        return json.loads(handle.readline())


def catalogue_images(catalogue: Path) -> list[dict]:
    """images.csv.gz rows."""
    with gzip.open(catalogue / "images.csv.gz", "rt") as handle:
        return list(csv.DictReader(handle))


def load_catalogue(catalogue: Path, out: Path) -> Path:
    """The catalogue without what the build drops on purpose (corrupt file, banners) and without the test
    listings, for load tests that expect only OK codes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "small").symlink_to(catalogue / "small")
    with gzip.open(catalogue / "images.csv.gz", "rt") as source, gzip.open(out / "images.csv.gz", "wt") as target:
        dropped = (CORRUPT_ID, *BANNER_IDS)
        rows = [line for line in source if line.split(",", 1)[0] not in dropped]
        target.writelines(rows)
    (out / "listings" / "metadata").mkdir(parents=True)
    for part in (catalogue / "listings" / "metadata").glob("listings_[0-3].json.gz"):
        (out / "listings" / "metadata" / part.name).symlink_to(part)
    return out


# The session's build takes the options that change the model (GeM pooling, the LDA head on product types) rather
# than the defaults: every end-to-end test then proves they are served exactly as built, at the price of one real
# build instead of two. The defaults (avg pooling, --head auto) are built for real by bench-quick in make test
# and by make demo; --head auto's choice is tested with the fake trunk (tests/builder/test_quality_build.py).
SESSION_BUILD_OPTIONS = ("--pooling", "gem", "--head", "lda")
BUILD_TIMEOUT_S = 900


def build_command(images: Path, out: Path, *extra: str) -> list:
    return [BIN / "lookalike-build", "build", "--images", images, "--out", out, "--chunk-size", "64", *extra]


def build(images: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(build_command(images, out, *extra), check=check, env=env(), capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)


def build_cli(*args, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """lookalike-build with the given arguments (hide, add, prune...); fails the test on a non-zero exit."""
    return subprocess.run([BIN / "lookalike-build", *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout_s, check=True)


def until(condition, timeout_s: float = 30.0) -> float:
    """Seconds until condition() holds (bounded; the test fails if it never does)."""
    begin = time.monotonic()
    while not condition():
        assert time.monotonic() - begin < timeout_s, "condition not reached"
        time.sleep(0.05)
    return time.monotonic() - begin


def copy_artifacts(source: Path, target: Path) -> Path:
    """A private copy of ARTIFACTS (its versions and CURRENT; not the feature cache nor leases), for a test
    that adds versions, moves CURRENT or breaks a file."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    return target


def add_version(artifacts_dir: Path, name: str, corrupt: bool = False, **manifest: object) -> str:
    """A copy of the version CURRENT names, as version `name` with `manifest`'s keys set in its manifest: a version
    to swap to without building one. `corrupt` breaks bytes of its index (its checksum no longer matches)."""
    from lookalike import artifacts

    target = artifacts_dir / name
    shutil.copytree(artifacts_dir / artifacts.read_current(artifacts_dir), target)
    path = target / artifacts.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **manifest, "version": name}))
    if corrupt:
        data = bytearray((target / "index.ann").read_bytes())
        data[100:110] = b"\xff" * 10
        (target / "index.ann").write_bytes(bytes(data))
    return name


class Served(NamedTuple):
    """A running server: the process, its address, its metrics port, the health statuses seen while
    it started, and its HTTP port (-1: off)."""

    process: subprocess.Popen
    address: str
    metrics_port: int
    health_seen: tuple[str, ...]
    http_port: int = -1

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextlib.contextmanager
def serving(artifacts: Path, *extra: str, ready_timeout_s: float = 120, tls_ca: Path | None = None,
            tls_client: tuple[Path, Path] | None = None):
    """Runs `lookalike-serve` on 127.0.0.1 and yields (process, address, metrics_port) once healthy."""
    port, metrics_port = free_port(), free_port()
    log_path = artifacts.parent / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([BIN / "lookalike-serve", "--artifacts", artifacts, "--port", str(port),
                                    "--metrics-port", str(metrics_port), "--watch-interval-s", "0.5",
                                    "--log-format", "text", *extra], env=env(), stdout=log,
                                   stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_healthy(address, process, ready_timeout_s, log_path, tls_ca, tls_client)
        yield process, address, metrics_port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def wait_healthy(address: str, process: subprocess.Popen, timeout_s: float, log_path: Path,
                 tls_ca: Path | None = None, tls_client: tuple[Path, Path] | None = None) -> None:
    from client import ImageSimilarityClient, LookalikeError

    cert, key = tls_client or (None, None)
    client = ImageSimilarityClient(address, timeout_s=2, root_ca=tls_ca, client_cert=cert, client_key=key)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                status = client.health()
                SEEN_HEALTH.append(status)
                if status == "SERVING":
                    return
            except LookalikeError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not healthy within {timeout_s} s: {log_path.read_text()[-3000:]}")
    finally:
        client.close()


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's Prometheus metrics as {'name{labels}': value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out
