"""Test helpers: catalogues with bad rows mixed in, free ports, and real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    return out


def make_catalogue(out: Path, limit: int) -> Path:
    """The committed sample (balanced subset) plus banners the filter must drop and a corrupt file."""
    subprocess.run([BIN / "lookalike-build", "sample", "fashion-mnist", "--out", out, "--limit", str(limit)],
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
    # On disk but not in images.csv.gz: its size must come from the file.
    (out / "small" / f"ba/{UNLISTED_BANNER_ID}.png").write_bytes(
        png_bytes(rng.integers(0, 255, (30, 300, 3), dtype=np.uint8)))
    with gzip.open(out / "images.csv.gz", "at", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return out


def load_catalogue(catalogue: Path, out: Path) -> Path:
    """The catalogue without its deliberately corrupt file, for load tests that expect only OK codes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "small").symlink_to(catalogue / "small")
    with gzip.open(catalogue / "images.csv.gz", "rt") as source, gzip.open(out / "images.csv.gz", "wt") as target:
        rows = [line for line in source if not line.startswith(CORRUPT_ID + ",")]
        target.writelines(rows)
    return out


def build(images: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "lookalike-build", "build", "--images", images, "--out", out,
                           "--chunk-size", "64", *extra], check=check, env=env(), capture_output=True,
                          text=True, timeout=900)


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
