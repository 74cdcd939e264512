"""Trained weights a suite caches between runs: where they live, how they are
written and how they are read back.

A suite that trains what it measures (the Medusa suite's base model, heads and
draft model) keys each result by a hash of everything its training depended on
and keeps it as cache_dir()/<suite>/<kind>-<key>.pt:

    path = checkpoints.path("medusa", "heads", checkpoints.key(CODE_VERSION, base_key, n_heads))
    if path.exists():
        payload = checkpoints.load(path, "medusa", required=("kind", "config", "state_dict"))
    else:
        checkpoints.save(path, dict(kind="heads", config=..., state_dict=...))

Files are read with torch.load(weights_only=True), so a foreign file cannot run
code; one that cannot be read, or lacks the expected entries, is a BadInput
naming it: a file of the cache can be deleted and trained again, a user's own
file (`--checkpoint`) is left alone. Checking that the weights fit the model
asked for is the caller's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from bench.env import cache_dir
from bench.errors import BadInput


def key(*parts: Any) -> str:
    """16 hex digits of a hash of `parts` (JSON-able, or turned into strings)."""
    blob = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def path(suite: str, kind: str, key: str) -> Path:
    return cache_dir() / suite / f"{kind}-{key}.pt"


def save(path: Path, payload: dict) -> None:
    # Written beside and renamed into place: an interrupted save never leaves a torn file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(path)


def _in_cache(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(cache_dir().resolve())


def load(path: Path, suite: str, required: tuple[str, ...]) -> dict:
    """The payload saved at `path`, on the CPU; a BadInput if it is unreadable or lacks a `required` entry."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a damaged or foreign file
        if _in_cache(path):
            advice = "delete it to retrain"
        else:
            advice = f"give a .pt file written by genbench (its {suite} checkpoints are in {cache_dir() / suite})"
        raise BadInput(f"cannot read checkpoint {path} ({type(exc).__name__}); {advice}") from None
    if not isinstance(payload, dict) or not set(required) <= set(payload):
        raise BadInput(f"{path} is not a genbench {suite} checkpoint (no {'/'.join(required)})")
    return payload
