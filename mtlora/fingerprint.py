"""Fingerprints that tie a result to what made it: the model, the data, and the code that matters.

A run (train.py's output folder, a table row's run folder) records these; a run is only reused or
resumed when they match. They are cheap: files are hashed by content (data) or by name + size
(model weights, which are large), never loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from mtlora.loading import WEIGHT_SUFFIXES, resolve_model_source

# Bump when a change to the code changes what a finished run would produce (training or evaluation),
# so that runs made before it are never reused as if they were made after it.
RESULTS_VERSION = 2


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (training and evaluation data are small enough to hash whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path, pattern: str = "*") -> str:
    """sha256 over the relative names and contents of the files under ``folder`` matching ``pattern``."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_fingerprint(path).encode())
    return digest.hexdigest()


def data_fingerprint(path: str | Path | None) -> str | None:
    """Content hash of a data file or folder (None for no path), computed once while it is unchanged."""
    if path is None:
        return None
    path = Path(path).resolve()
    stamp = (max((p.stat().st_mtime_ns for p in path.rglob("*")), default=path.stat().st_mtime_ns) if path.is_dir()
             else path.stat().st_mtime_ns)
    return _data_fingerprint(str(path), stamp)


@functools.lru_cache(maxsize=None)
def _data_fingerprint(path: str, stamp: int) -> str:
    return folder_fingerprint(path) if Path(path).is_dir() else file_fingerprint(path)


def model_fingerprint(model_name_or_path: str | None) -> dict:
    """What identifies a base model without loading it.

    Local folder: its resolved path, a hash of config.json and the names and sizes of its weight files.
    GGUF file: its resolved path, name and size. Hub id: the id (the revision is the Hub's ``main``).
    """
    folder, gguf_file = resolve_model_source(model_name_or_path)
    local = Path(folder)
    if not local.is_dir():
        return {"hub_id": folder}
    if gguf_file:
        return {"path": str(local.resolve()), "gguf": gguf_file, "size": (local / gguf_file).stat().st_size}
    weights = sorted((f.name, f.stat().st_size) for f in local.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    return {"path": str(local.resolve()), "config_sha256": file_fingerprint(local / "config.json"),
            "weights": [list(w) for w in weights]}


def digest(payload: dict, length: int = 12) -> str:
    """A short stable hash of a JSON-serialisable dict (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]
