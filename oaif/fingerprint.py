"""What a model, a prompt file or an output holds, as a short hash: the judgment cache keys
local judges by it, a run's identity names its start model and prompt file by it, and an
output's marker vouches for the file oaif wrote. No oaif imports: every layer uses it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from oaif.bundled import data_path


def model_fingerprint(model: str) -> str:
    """What a local judge model folder holds, cheaply: its config and, per weight file, the
    name, size and first and last MiB (a retrained or replaced model at the same path gets
    a new key). A hub id is its own fingerprint."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def content_fingerprint(path: str) -> str:
    """sha256 of a file, or of a folder's files (a saved dataset); a hub name is itself."""
    p = data_path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    if not files:
        return path
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if f != p else "").encode())
        file_sha256(f, h)
    return h.hexdigest()[:16]


def file_sha256(path: Path, h=None) -> str:
    """A file's sha256 (hex), read a MiB at a time; `h`: a running hash to feed instead."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
