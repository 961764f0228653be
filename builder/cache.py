"""What a build never computes twice: file scans by (path, size, mtime), features by model and content.

Layout of a cache folder (by default ARTIFACTS/.features, or --feature-cache DIR shared by builds):

    scan/<shard>.parquet        uri, bytes, mtime, sha256, file_width, file_height, error
    models/<model key>/model.json   what the key stands for (backbone, weights, preprocessing, ...)
    models/<model key>/trunk/   the SavedModel the executors run, exported once per model
    models/<model key>/shards/<shard>/   parquet: sha256, features, error (Spark's own writer)

Every shard appears by one rename once complete, so a build killed at any point leaves only
`.tmp-*` folders that no reader looks at, and a build run again finds what the killed one finished.
Builds sharing a cache may embed the same image at the same time: readers keep one row per sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lookalike.artifacts import sha256_file
from lookalike.preprocess import INPUT_SIZE

DEFAULT_CACHE = ".features"
# Bumped when the features' meaning changes (preprocessing code, pooling...): old shards stop matching.
FEATURE_FORMAT = 1
TMP_PREFIX = ".tmp-"
SCAN_COLUMNS = ["uri", "bytes", "mtime", "sha256", "file_width", "file_height", "error"]


def model_identity(backbone: str, weights_source: str, weights_file: str | None, preprocessing: str,
                   head: str, pooling: str = "avg", mirror: bool = False) -> dict:
    """Everything the raw features depend on. The PCA and LDA heads are fitted after, per build, so they
    are not here; the seed's random-conv head and the pooling are part of the trunk, so they are."""
    weights = weights_source
    if weights_file is not None:
        weights = f"file sha256 {sha256_file(Path(weights_file))}"
    return {"backbone": backbone, "weights": weights, "preprocessing": preprocessing, "input_size": INPUT_SIZE,
            "trunk_head": head if head == "random-conv" else "none", "pooling": pooling,
            "mirror": mirror,
            "feature_format": FEATURE_FORMAT}


def model_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def publish(tmp: Path, final: Path) -> bool:
    """Renames a finished folder into place; False (and tmp removed) when another build got there first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def new_tmp(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{TMP_PREFIX}{uuid.uuid4().hex}"


def shard_name() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class FeatureCache:
    root: Path

    @property
    def scan_dir(self) -> Path:
        return self.root / "scan"

    def model_dir(self, key: str) -> Path:
        return self.root / "models" / key

    def trunk_dir(self, key: str) -> Path:
        return self.model_dir(key) / "trunk"

    def shards_dir(self, key: str) -> Path:
        return self.model_dir(key) / "shards"

    # -- scans ------------------------------------------------------------------------------------

    def read_scans(self) -> pd.DataFrame:
        """Every cached scan, one row per (uri, bytes, mtime): a file seen before, unchanged."""
        files = sorted(p for p in self.scan_dir.glob("*.parquet")) if self.scan_dir.is_dir() else []
        if not files:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in SCAN_COLUMNS})
        table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return table.drop_duplicates(["uri", "bytes", "mtime"], keep="last").reset_index(drop=True)

    def add_scans(self, scans: pd.DataFrame) -> None:
        if scans.empty:
            return
        self.scan_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.scan_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}.parquet"
        scans[SCAN_COLUMNS].to_parquet(tmp, index=False)
        os.rename(tmp, self.scan_dir / f"{shard_name()}.parquet")

    # -- features ---------------------------------------------------------------------------------

    def register_model(self, key: str, identity: dict) -> None:
        folder = self.model_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "model.json").exists():
            tmp = folder / f"{TMP_PREFIX}model.json"
            tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, folder / "model.json")

    def _shards(self, key: str) -> list[Path]:
        folder = self.shards_dir(key)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)
                      and (p / "_SUCCESS").exists())

    @staticmethod
    def _dataset(shards: list[Path]) -> ds.Dataset:
        return ds.dataset([str(f) for shard in shards for f in sorted(shard.glob("*.parquet"))], format="parquet")

    def known(self, key: str) -> set[str]:
        """The sha256 of every image this model has embedded (or failed to, which is as final)."""
        shards = self._shards(key)
        if not shards:
            return set()
        return set(self._dataset(shards).to_table(columns=["sha256"]).column("sha256").to_pylist())

    def read(self, key: str, wanted: set[str]) -> tuple[dict[str, int], np.ndarray, dict[str, str]]:
        """Features of the wanted contents: (sha256 -> row of the matrix, matrix [N, F], sha256 -> error)."""
        shards = self._shards(key)
        if not shards or not wanted:
            return {}, np.zeros((0, 0), np.float32), {}
        table = self._dataset(shards).to_table(filter=ds.field("sha256").isin(pa.array(sorted(wanted), pa.string())))
        frame = table.to_pandas().drop_duplicates("sha256")
        errors = frame[frame["error"].notna()]
        good = frame[frame["error"].isna()]
        features = (np.stack(good["features"].to_numpy()).astype(np.float32) if len(good)
                    else np.zeros((0, 0), np.float32))
        return ({sha: n for n, sha in enumerate(good["sha256"])}, features,
                dict(zip(errors["sha256"], errors["error"], strict=True)))

    def compact(self, key: str, keep: set[str], min_age_s: float = 0.0) -> tuple[int, int]:
        """Rewrites the model's shards older than min_age_s as one holding only `keep`; returns (rows
        before, rows after). Younger shards, perhaps of a build still running, are left as they are."""
        now = time.time()
        shards = [s for s in self._shards(key) if now - (s / "_SUCCESS").stat().st_mtime >= min_age_s]
        if not shards:
            return 0, 0
        table = self._dataset(shards).to_table()
        before = table.num_rows
        kept = table.filter(pc.is_in(table.column("sha256"), pa.array(sorted(keep), pa.string())))
        if kept.num_rows == before and len(shards) == 1:
            return before, before
        if kept.num_rows:
            tmp = new_tmp(self.shards_dir(key))
            tmp.mkdir()
            pq.write_table(kept, tmp / "part-0.parquet")
            (tmp / "_SUCCESS").touch()
            os.rename(tmp, self.shards_dir(key) / shard_name())
        for shard in shards:
            shutil.rmtree(shard, ignore_errors=True)
        return before, kept.num_rows

    def models(self) -> list[str]:
        folder = self.root / "models"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def remove_model(self, key: str) -> None:
        shutil.rmtree(self.model_dir(key), ignore_errors=True)

    def remove_stale_tmp(self, older_than_s: float = 3600) -> int:
        """Leftovers of killed builds (never of a running one: those are younger than an hour's work)."""
        removed = 0
        now = time.time()
        for path in self.root.rglob(f"{TMP_PREFIX}*") if self.root.is_dir() else []:
            try:
                if now - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
