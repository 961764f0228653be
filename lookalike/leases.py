"""Leases: how `prune` knows which versions running servers still have mapped.

Each server keeps one file in `ARTIFACTS/.leases/` naming the versions it has loaded (the served one,
and one still finishing its requests after a swap) and when the lease expires. It rewrites the file
well before then and deletes it when it stops. A lease is live until it expires, so a server on
another host sharing ARTIFACTS is respected; a lease from a process of this host that no longer exists
is dead at once (a killed server does not hold versions for a whole TTL).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lookalike.artifacts import write_atomic

LEASES_DIR = ".leases"


def write_lease(artifacts: Path, holder: str, versions: list[str], ttl_s: float) -> Path:
    """Writes (atomically) or renews this holder's lease."""
    folder = artifacts / LEASES_DIR
    folder.mkdir(exist_ok=True)
    payload = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "versions": sorted(versions),
               "expires_at": time.time() + ttl_s}
    path = folder / f"{holder}.json"
    # Renewed every few seconds and worthless after a crash of its host: no fsync.
    write_atomic(path, json.dumps(payload), durable=False)
    return path


def remove_lease(artifacts: Path, holder: str) -> None:
    (artifacts / LEASES_DIR / f"{holder}.json").unlink(missing_ok=True)


def _process_gone(lease: dict) -> bool:
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def leased_versions(artifacts: Path, now: float | None = None) -> dict[str, set[str]]:
    """Live leases: holder -> the versions it has mapped. Lease files are replaced atomically, so one
    that cannot be read is not a lease."""
    now = time.time() if now is None else now
    out: dict[str, set[str]] = {}
    folder = artifacts / LEASES_DIR
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        try:
            lease = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if lease.get("expires_at", 0) > now and not _process_gone(lease):
            out[str(lease.get("holder", path.stem))] = set(lease.get("versions", []))
    return out
