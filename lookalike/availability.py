"""Which products are hidden (out of stock, delisted, blocked): one small file beside CURRENT.

`ARTIFACTS/availability.json` is replaced atomically (write beside, fsync, rename), so a server never
reads half of it; writers take an exclusive lock, so two `hide` commands never lose each other's
changes; every change increments `version`, which servers report with each answer. Hiding needs no
rebuild: it is by product id, so it applies to whichever version is served.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lookalike.artifacts import write_atomic

AVAILABILITY_FILE = "availability.json"
LOCK_FILE = ".availability.lock"
REASONS = ("out_of_stock", "delisted", "blocked")


class AvailabilityError(ValueError):
    """availability.json is unreadable or malformed; the message says why."""


@dataclass(frozen=True)
class Availability:
    """version 0 is a catalogue where nothing was ever hidden."""

    version: int = 0
    # product id -> {"reason": ..., "since": ISO time}
    hidden: dict[str, dict] = field(default_factory=dict)
    updated_at: str | None = None

    @property
    def hidden_ids(self) -> frozenset[str]:
        return frozenset(self.hidden)


def read_availability(artifacts: Path) -> Availability:
    path = artifacts / AVAILABILITY_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return Availability()
    # ValueError: not JSON, not UTF-8, or an integer past Python's digit limit; RecursionError: nested too deep.
    except (OSError, ValueError, RecursionError) as error:
        raise AvailabilityError(f"{path} cannot be read: {error}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("version"), int) \
            or not isinstance(payload.get("hidden"), dict):
        raise AvailabilityError(f"{path} is not an availability file (version and hidden expected)")
    return Availability(payload["version"], payload["hidden"], payload.get("updated_at"))


@contextmanager
def _locked(artifacts: Path):
    with open(artifacts / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(artifacts: Path, availability: Availability) -> None:
    payload = {"version": availability.version, "updated_at": availability.updated_at,
               "hidden": dict(sorted(availability.hidden.items()))}
    write_atomic(artifacts / AVAILABILITY_FILE, json.dumps(payload, indent=1) + "\n")


def change_availability(artifacts: Path, hide: Iterable[str] = (), show: Iterable[str] = (),
                        reason: str = "out_of_stock") -> tuple[Availability, int]:
    """Hides and shows products under the lock; returns the new state and how many products changed.
    A change that changes nothing keeps the version as it is."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {reason!r}")
    hide, show = list(dict.fromkeys(hide)), list(dict.fromkeys(show))
    for product_id in (*hide, *show):
        if not isinstance(product_id, str) or not product_id.strip() or product_id != product_id.strip():
            raise ValueError(f"{product_id!r} is not a product id")
    with _locked(artifacts):
        current = read_availability(artifacts)
        hidden = dict(current.hidden)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        changed = 0
        for product_id in hide:
            if product_id not in hidden:
                hidden[product_id] = {"reason": reason, "since": now}
                changed += 1
        for product_id in show:
            changed += hidden.pop(product_id, None) is not None
        if not changed:
            return current, 0
        new = Availability(current.version + 1, hidden, now)
        _write(artifacts, new)
        return new, changed
