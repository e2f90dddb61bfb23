"""The one rule for every path an oaif command writes as an output (`--out`, init-tiny's
DIR, a run's report/ and dataset/):

- Created new. A path that exists is an error (an empty folder counts as new: it holds
  nothing to lose), checked by `check` before any expensive work (sampling, judging,
  training), as is a missing parent folder and a file where a folder is wanted or the reverse.
- Replaced only when asked (`--overwrite`, overwrite=True) and only if oaif wrote it: a
  folder holds the marker file `.oaif-output` (its kind and the entries oaif put there; a
  folder holding anything else is left alone); a file has the sidecar `.NAME.oaif-output`
  beside it, with the SHA-256 of what oaif wrote (a file changed since, or put there by
  someone else, is left alone). A sidecar, not a header row: `oaif offline` and `datasets`
  read the JSONL outputs as they are. A link is never written through or replaced.
- Written whole: built under a hidden name beside the destination (`.NAME.*.oaif-new`), then
  renamed into place. A folder replaced is renamed aside first, the new one renamed in, then
  the old one deleted; a crash leaves the old output or the new one, never half of one.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, TextIO

from oaif.faults import crash_point
from oaif.fingerprint import file_sha256
from oaif.records import fsync_path, to_json

MARKER = ".oaif-output"


def sidecar(out: Path) -> Path:
    """Where a file output's marker lives (hidden, beside it)."""
    return out.with_name(f".{out.name}{MARKER}")


def check(out: str | Path, kind: str, *, folder: bool, overwrite: bool = False, legacy: Iterable[str] = (),
          parents: bool = False) -> bool:
    """Raise (one line naming `out`) unless oaif may write the `kind` (a folder or a file) at
    `out`. legacy: the entry names of a folder output written before markers existed, accepted
    as oaif's (only for paths oaif picks itself inside a run directory). parents: missing
    parent folders are made at write time (init-tiny's models/). Returns whether an earlier
    output is to be replaced."""
    out = Path(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"{out}: {out.parent} is a file, not a folder; pick another path")
    if not parents and not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: folder {out.parent} does not exist; create it or pick another path")
    if out.is_symlink():
        raise FileExistsError(f"{out} is a link: oaif never writes through or replaces a link; pick another path")
    if not out.exists():
        return False
    if folder and not out.is_dir():
        raise ValueError(f"{out} is a file, but an oaif {kind} is a folder; pick another path")
    if not folder and not out.is_file():
        raise ValueError(f"{out} is a folder (or not a regular file), but an oaif {kind} is a file: give a file "
                         f"path, e.g. {out / 'out.jsonl'}")
    if folder and not any(out.iterdir()):
        return False
    if not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace an earlier oaif {kind} there, "
                              f"or pick another path")
    reason = _folder_not_ours(out, kind, set(legacy)) if folder else _file_not_ours(out, kind)
    if reason:
        raise FileExistsError(f"{out} {reason}: it is not an oaif {kind} and is left alone "
                              f"(--overwrite replaces only what oaif wrote); pick another path")
    return True


def _read_marker(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("oaif_output"), str) else None


def _folder_not_ours(out: Path, kind: str, legacy: set[str]) -> str | None:
    names = {p.name for p in out.iterdir()}
    info = _read_marker(out / MARKER)
    if info is None:
        if legacy and names <= legacy:   # an output of this kind from before markers, at oaif's own path
            return None
        return f"has no {MARKER} marker (oaif did not write it)"
    if info["oaif_output"] != kind:
        return f"holds an oaif {info['oaif_output']}"
    other = sorted(names - set(info.get("entries", [])) - {MARKER})
    return f"holds {', '.join(other[:5])}, which oaif did not write" if other else None


def _file_not_ours(out: Path, kind: str) -> str | None:
    info = _read_marker(sidecar(out))
    if info is None:
        return f"has no {sidecar(out).name} beside it (oaif did not write it)"
    if info["oaif_output"] != kind:
        return f"is an oaif {info['oaif_output']}"
    return None if file_sha256(out) in info.get("sha256", []) else "was changed since oaif wrote it"


def _write_marker(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".oaif-new")
    tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
    os.replace(tmp, path)   # replaces a link at `path` itself, never its target


def write_folder(out: str | Path, kind: str, fill: Callable[[Path], None], *, overwrite: bool = False,
                 legacy: Iterable[str] = (), parents: bool = False, crash: str = "") -> Path:
    """fill(staging) writes the output's files into a hidden folder beside `out`, which then
    takes its place with the marker in it. Checked again first: the path may have changed
    during the work. crash: a crash point (faults.py) between the two renames of a replace.
    Returns `out`."""
    out = Path(out)
    replacing = check(out, kind, folder=True, overwrite=overwrite, legacy=legacy, parents=parents)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".oaif-new", dir=out.parent))
    try:
        # Marked from the start, so that a crash mid-write leaves a folder the next write may remove.
        _write_marker(staging / MARKER, {"oaif_output": kind, "entries": []})
        fill(staging)
        entries = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
        _write_marker(staging / MARKER, {"oaif_output": kind, "entries": entries})
        staging.chmod(0o755)   # mkdtemp makes it private; an output is an ordinary folder
        for p in [*staging.rglob("*"), staging]:   # on the disk before the rename makes it the output
            if not p.is_symlink():
                fsync_path(p)
        if replacing:
            _replace_folder(staging, out, crash)
        else:
            try:
                os.rename(staging, out)   # onto nothing or an empty folder; refuses one that filled meanwhile
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise FileExistsError(f"{out} appeared while oaif worked; it is left alone: pick another path "
                                      f"(or pass --overwrite if oaif wrote it)") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(out.parent)
    return out


def _remove_leftovers(out: Path) -> None:
    """Folders of an earlier write of `out` cut short by a crash (they carry the marker)."""
    for p in [*out.parent.glob(f".{glob.escape(out.name)}.*.oaif-new"),
              *out.parent.glob(f".{glob.escape(out.name)}.*.oaif-old")]:
        if p.is_dir() and not p.is_symlink() and _read_marker(p / MARKER) is not None:
            shutil.rmtree(p)


def _replace_folder(staging: Path, out: Path, crash: str) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".oaif-old", dir=out.parent))
    os.rename(out, old)   # onto the empty folder mkdtemp made
    if crash:
        crash_point(crash)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)   # the earlier output back where it was
        raise
    shutil.rmtree(old)


def write_file(out: str | Path, kind: str, write: Callable[[TextIO], None], *, overwrite: bool = False) -> Path:
    """write(f) writes the output into an open text file beside `out`, which then takes its
    place; its sidecar records its SHA-256. Checked again first. Returns `out`."""
    out = Path(out)
    replacing = check(out, kind, folder=False, overwrite=overwrite)
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.oaif-new"):   # an earlier write of it cut short
        if p.is_file() and not p.is_symlink():
            p.unlink()
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".oaif-new", dir=out.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)   # mkstemp makes it private; an output is an ordinary file
        digest, side = file_sha256(tmp), sidecar(out)
        # While the file is swapped the sidecar vouches for both contents, so a crash at any
        # point leaves a file that oaif still recognises as its own.
        before = _read_marker(side)["sha256"] if replacing else []
        _write_marker(side, {"oaif_output": kind, "sha256": [*before, digest]})
        os.replace(tmp, out)
        _write_marker(side, {"oaif_output": kind, "sha256": [digest]})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)
    return out


def write_jsonl(out: str | Path, kind: str, rows: Iterable, *, overwrite: bool = False) -> Path:
    """Rows (dicts or dataclasses) as a JSONL output file, one per line."""
    def write(f: TextIO) -> None:
        for row in rows:
            f.write(to_json(row) + "\n")

    return write_file(out, kind, write, overwrite=overwrite)
