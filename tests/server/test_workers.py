"""`lookalike-serve --workers 2` for real: one port, load spread over both workers, metrics summed,
availability and SIGHUP reaching every worker, a version with a model of its own served by fresh workers, a killed
worker restarted, SIGTERM draining them all."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from bench.scale import BackgroundLoad
from client import ImageSimilarityClient, LookalikeError
from lookalike import artifacts
from tests import helpers

pytestmark = pytest.mark.e2e
LOADGEN = helpers.REPO / "build" / "clients" / "bin" / "lookalike-loadgen"


@pytest.fixture
def served_copy(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    return out


@pytest.fixture(scope="module")
def loadgen():
    if not LOADGEN.exists():
        subprocess.run(["bash", helpers.REPO / "client" / "build-clients.sh"], check=True, capture_output=True,
                       timeout=1200)
    return LOADGEN


def _workers(supervisor: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(supervisor.pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


def _requests_by_worker(workers: list[int]) -> dict[int, float]:
    """FindSimilar requests each worker counted, read from its own file in the supervisor's multiprocess
    metrics folder (the worker's PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    environ = open(f"/proc/{workers[0]}/environ", "rb").read().split(b"\0")
    folder = Path(next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).decode())
    counts = {}
    for pid in workers:
        path = folder / f"counter_{pid}.db"
        metrics = MultiProcessCollector.merge([str(path)], accumulate=False) if path.exists() else []
        counts[pid] = sum(sample.value for metric in metrics for sample in metric.samples
                          if sample.name == "lookalike_requests_total" and sample.labels.get("method") == "FindSimilar")
    return counts


def _until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def _metric(metrics_port: int, key: str) -> float:
    return helpers.scrape(metrics_port).get(key, 0.0)


def _fresh_answers(address: str, product_id: str, connections: int = 12) -> list[list[str]]:
    """One query per new connection: the kernel spreads connections over the workers."""
    answers = []
    for _ in range(connections):
        with ImageSimilarityClient(address) as client:
            answers.append([m.product_id for m in client.find_similar(product_id=product_id, k=10)])
    return answers


def test_two_workers_share_one_port_metrics_availability_restart_and_drain(served_copy, loadgen, catalogue,
                                                                           tmp_path):
    queries = helpers.load_catalogue(catalogue, tmp_path / "queries")
    http_port = helpers.free_port()
    with helpers.serving(served_copy, "--workers", "2", "--http-port", str(http_port)) as (supervisor, address,
                                                                                              metrics_port):
        _until(lambda: _metric(metrics_port, "lookalike_workers{state=ready}") == 2)
        workers = _workers(supervisor)
        assert len(workers) == 2
        report = json.loads(subprocess.run(
            [loadgen, "--address", address, "--catalogue", str(queries), "--mix", "product=1", "--requests", "600",
             "--concurrency", "8", "--connections", "8", "--duration", "60s", "--json"],
            capture_output=True, text=True, timeout=120, check=True).stdout)
        assert report["codes"] == {"OK": 600}
        # Both map one copy of the version's index, vectors and neighbour lists: the page cache's pages, shared.
        version_dir = (served_copy / artifacts.read_current(served_copy)).resolve()
        shared = {version_dir / "index.ann", version_dir / "vectors.npy",
                  *(path.resolve() for path in (version_dir / "neighbours").glob("*.npy"))}
        assert len(shared) == 8  # the index, the vectors and six list arrays
        for pid in workers:
            mapped = {Path(line.split(maxsplit=5)[5]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                      if len(line.split(maxsplit=5)) == 6}
            assert shared <= mapped, (pid, sorted(map(str, shared - mapped)))
        # The supervisor's /metrics sums what the workers counted, each in its own file.
        assert _metric(metrics_port, "lookalike_requests_total{code=OK,method=FindSimilar}") == 600
        assert sum(_requests_by_worker(workers).values()) == 600
        # Both workers answer on the one port. The kernel spreads connections at random (8 connections all
        # land on one worker once in 128 runs), so fresh ones are opened until each worker has answered;
        # 64 all on one worker would be a chance of 2^-63.
        product = pd.read_parquet(served_copy / artifacts.read_current(served_copy) / artifacts.IMAGES_FILE)[
            "product_id"].iloc[0]
        for _ in range(64):
            if min(_requests_by_worker(workers).values()) > 0:
                break
            _fresh_answers(address, product, 1)
        by_worker = _requests_by_worker(workers)
        assert min(by_worker.values()) > 0, by_worker
        # Every worker serves HTTP on the one HTTP port too: 24 fresh connections all on one worker would be a
        # chance of 2^-23.
        before = _requests_by_worker(workers)
        for _ in range(24):
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/similar", method="POST",
                                             data=json.dumps({"productId": product, "k": 3}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200 and len(json.loads(response.read())["matches"]) == 3
        by_worker = _requests_by_worker(workers)
        assert all(by_worker[pid] > before[pid] for pid in workers), (before, by_worker)
        assert _metric(metrics_port, "lookalike_requests_total{code=OK,method=FindSimilar}") == sum(by_worker.values())
        served = [k for k in helpers.scrape(metrics_port) if k.startswith("lookalike_served_info")]
        assert len(served) == 2 and all(str(pid) in " ".join(served) for pid in workers)

        # Hiding a product reaches every worker: no fresh connection, whichever worker it lands on, shows it.
        images = pd.read_parquet(served_copy / artifacts.read_current(served_copy) / artifacts.IMAGES_FILE)
        query = images["product_id"].iloc[0]
        shown = _fresh_answers(address, query, 4)[0][0]
        subprocess.run([helpers.BIN / "lookalike-build", "hide", "--out", served_copy, shown], check=True,
                       capture_output=True, env=helpers.env(), timeout=60)
        _until(lambda: _metric(metrics_port, "lookalike_availability_version{}") == 1)
        assert all(shown not in answer for answer in _fresh_answers(address, query))

        # A new version and SIGHUP: every worker swaps to it.
        artifacts.write_current(served_copy, helpers.add_version(served_copy, "v-next"))
        supervisor.send_signal(signal.SIGHUP)
        _until(lambda: _served_versions(metrics_port) == {pid: "v-next" for pid in workers})
        assert all(_answer_version(address) == "v-next" for _ in range(4))

        # A version with a model of its own (another preprocessing: another model identity) is not swapped in, which
        # would cost each worker a full collection of its heap: fresh workers load it, one at a time, and the old
        # ones drain and exit. The port answers throughout.
        # The same SavedModel behind the other preprocessing: another model identity to the server, and it loads.
        plain = json.loads((served_copy / "v-next" / artifacts.MANIFEST).read_text())["preprocessing"] == "plain"
        artifacts.write_current(served_copy, helpers.add_version(served_copy, "v-model",
                                                                 preprocessing="clahe-grey" if plain else "plain"))
        answered = []
        deadline = time.monotonic() + 240
        # Beside the fresh connections, the load generator's, opened before and held throughout: a replaced worker
        # finishes what they send, then they move on to the fresh workers.
        # And the Python client's one channel, held too: what the shipped retry policy makes of the hand-over.
        with BackgroundLoad(address, queries, "product=1,id=1", 2) as held, HeldClient(address, query) as client:
            while set(_served_versions(metrics_port).values()) != {"v-model"} or len(_workers(supervisor)) != 2:
                assert time.monotonic() < deadline, (_served_versions(metrics_port), _workers(supervisor))
                answered += [bool(answer) for answer in _fresh_answers(address, query, 1)]
        # Its retries (UNAVAILABLE, CANCELLED) take the calls a shutdown cuts: none may surface. A reconnect meeting
        # the closing listener can outlast them (the channel's ~1 s reconnect backoff against ~0.7 s of retries): that
        # one UNAVAILABLE is allowed (README: tcp_migrate_req).
        assert client.answers > 0 and all(f.startswith("UNAVAILABLE") for f in client.failures), client.failures
        # The raw load generator (no retries) sees those two: a call reaching a replaced worker after gRPC's shutdown
        # began (before the client has read its GOAWAY) is cancelled, and while a reconnect that met the closing
        # listener backs off, its calls fail at once (UNAVAILABLE: how many depends on the backoff, not the load).
        # Measured: 0 to 4 cancelled, once 147 UNAVAILABLE, of 30,000 to 160,000 calls; no other code. The load
        # generator spells codes as grpc-go does.
        codes = held.report["codes"]
        assert codes.get("OK", 0) > 0 and set(codes) <= {"OK", "CANCELED", "UNAVAILABLE"}, codes
        replaced = _workers(supervisor)
        assert not set(replaced) & set(workers) and set(_served_versions(metrics_port)) == set(replaced)
        assert _metric(metrics_port, "lookalike_worker_replacements_total{result=replaced}") == 2
        assert _metric(metrics_port, "lookalike_reloads_total{result=handed_over}") >= 2
        assert _metric(metrics_port, "lookalike_retire_collection_seconds_count{}") == 0  # no full collection
        assert answered and all(answered)
        assert all(_answer_version(address) == "v-model" for _ in range(4))
        workers = replaced

        # A worker that dies is restarted; the port answers on.
        os.kill(workers[0], signal.SIGKILL)
        _until(lambda: _metric(metrics_port, "lookalike_worker_restarts_total{}") == 1)
        _until(lambda: _metric(metrics_port, "lookalike_workers{state=ready}") == 2)
        replacement = [pid for pid in _workers(supervisor) if pid not in workers]
        assert len(replacement) == 1 and len(_workers(supervisor)) == 2
        assert all(answer for answer in _fresh_answers(address, query, 6))

        # SIGTERM drains every worker and the supervisor exits 0.
        children = _workers(supervisor)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in children)


class HeldClient:
    """One ImageSimilarityClient (one channel) asking for a product's neighbours every 20 ms on a thread until the
    block ends; counts its answers and keeps its failures."""

    def __init__(self, address: str, product_id: str) -> None:
        self.address, self.product_id = address, product_id
        self.answers, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with ImageSimilarityClient(self.address) as client:
            while not self._stop.wait(0.02):
                try:
                    client.find_similar(product_id=self.product_id, k=10)
                    self.answers += 1
                except LookalikeError as error:
                    self.failures.append(f"{error.code.name}: {error.details}")
                except Exception as error:  # noqa: BLE001 (kept for the test to show, not lost with the thread)
                    self.failures.append(repr(error))

    def __enter__(self) -> "HeldClient":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def _served_versions(metrics_port: int) -> dict[int, str]:
    """The version each worker serves, from the supervisor's per-worker lookalike_served_info gauges."""
    served = {}
    for key, value in helpers.scrape(metrics_port).items():
        if key.startswith("lookalike_served_info{") and value == 1:
            labels = dict(part.split("=", 1) for part in key[key.index("{") + 1:-1].split(","))
            served[int(labels["pid"])] = labels["version"]
    return served


def _answer_version(address: str) -> str:
    with ImageSimilarityClient(address) as client:
        return client.info()["version"]


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_a_worker_that_cannot_load_stops_the_server(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    index = out / artifacts.read_current(out) / artifacts.INDEX_FILE
    index.write_bytes(index.read_bytes()[:-64])
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", "0", "--metrics-port",
                             "-1", "--workers", "2", "--log-format", "text"], capture_output=True, text=True,
                            env=helpers.env(), timeout=180)
    assert result.returncode != 0
    assert "before it ever served: stopping" in result.stderr
