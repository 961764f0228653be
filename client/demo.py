"""`make demo`: sample catalogue -> build -> serve -> product queries and a contact sheet of products."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OUT = Path(os.environ.get("LOOKALIKE_DEMO_DIR", "demo-out"))
# Products in the demo catalogue: about 2,100 images (each product has 1 to 4 photos).
PRODUCTS = 1000


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_serving(address: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    from client import ImageSimilarityClient, LookalikeError

    with ImageSimilarityClient(address, timeout_s=2) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}; see {OUT / 'server.log'}")
            try:
                if client.health() == "SERVING":
                    return
            except LookalikeError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"the server was not SERVING after {timeout_s} s; see {OUT / 'server.log'}")


def _post_json(url: str, body: dict) -> str:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.dumps(json.loads(response.read()), indent=1)


def demo_products(catalogue: Path, count: int = 3) -> list[str]:
    """The first product of `count` different product types, from the catalogue's ABO listings."""
    chosen: dict[str, str] = {}
    with gzip.open(catalogue / "listings" / "metadata" / "listings_0.json.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            listing = json.loads(line)
            product_type = listing["product_type"][0]["value"]
            if len(listing.get("other_image_id", [])) >= 1 and product_type not in chosen:
                chosen[product_type] = listing["item_id"]
            if len(chosen) == count:
                break
    return list(chosen.values())


def main() -> int:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    catalogue, artifacts = OUT / "catalogue", OUT / "ARTIFACTS"
    started = time.monotonic()
    _step(f"writing the sample catalogue (Fashion-MNIST products with ABO listings) to {catalogue}")
    subprocess.run([_bin("lookalike-build"), "sample", "fashion-mnist", "--out", catalogue, "--limit",
                    str(PRODUCTS)], check=True, env=env)
    _step(f"building an index with Spark into {artifacts} (a rerun embeds only what changed)")
    subprocess.run([_bin("lookalike-build"), "--log-level", "WARNING", "build", "--images", catalogue,
                    "--out", artifacts], check=True, env=env)
    port, http_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    _step(f"starting lookalike-serve on {address} (gRPC) and 127.0.0.1:{http_port} (HTTP/JSON and the console)")
    with open(OUT / "server.log", "w") as log:
        server = subprocess.Popen([_bin("lookalike-serve"), "--artifacts", artifacts, "--port", str(port),
                                   "--http-port", str(http_port), "--metrics-port", "-1"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_serving(address, server)
        console = f"http://127.0.0.1:{http_port}/"
        _step(f"the console: {console} (JSON: curl -s {console}v1/info)")
        lookalike = [_bin("lookalike"), "--address", address]
        subprocess.run([*lookalike, "info"], check=True)
        products = demo_products(catalogue)
        for product in products:
            _step(f"lookalike similar --product {product} -k 5 --group-size 2 --with-attributes")
            subprocess.run([*lookalike, "similar", "--product", product, "-k", "5", "--group-size", "2",
                            "--with-attributes", "--catalogue", catalogue], check=True)
        recommend = ["recommend", "--positive", products[0], "--negative", products[1], "--filter", "color!=Black",
                     "-k", "5", "--with-attributes"]
        _step(f"lookalike {' '.join(recommend)} (more like the first, less like the second, not black)")
        subprocess.run([*lookalike, *recommend], check=True)
        _step(f"the same over HTTP/JSON: POST {console}v1/similar {{\"productId\": \"{products[0]}\", \"k\": 3}}")
        print(_post_json(f"{console}v1/similar", {"productId": products[0], "k": 3}), flush=True)
        sheet = OUT / "contact-sheet.png"
        query_image = next((catalogue / "small").rglob("*.png"))
        _step(f"lookalike similar {query_image} (a photo as the query) -k 11 --sheet {sheet}")
        subprocess.run([*lookalike, "similar", query_image, "-k", "11", "--include-query", "--catalogue",
                        catalogue, "--sheet", sheet], check=True)
        if sys.stdin.isatty() and os.environ.get("LOOKALIKE_DEMO_KEEP") != "0":
            _step(f"the console stays at {console} until you press Enter (LOOKALIKE_DEMO_KEEP=0: stop at once)")
            input()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    _step(f"done in {time.monotonic() - started:.0f} s. Contact sheet: {sheet.resolve()}. "
          f"The console was at {console}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
