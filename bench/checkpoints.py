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
naming it. Checking that the weights fit the model asked for is the suite's job.
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


def load(path: Path, suite: str, required: tuple[str, ...]) -> dict:
    """The payload saved at `path`, on the CPU; a BadInput if it is unreadable or lacks a `required` entry."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to remove
        raise BadInput(f"cannot read checkpoint {path} ({type(exc).__name__}); delete it to retrain") from None
    if not isinstance(payload, dict) or not set(required) <= set(payload):
        raise BadInput(f"{path} is not a genbench {suite} checkpoint (no {'/'.join(required)})")
    return payload
