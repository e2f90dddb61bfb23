"""Scratch files an oaif process owns, named by its pid, so that what a SIGKILL leaves behind
(no `finally` runs) is found and removed by the next oaif process.

- `private_tempdir()`: for the `oaif` command, one temp folder `TMP/oaif-tmp-PID` for the
  process and every child it starts (vLLM's engine process, its file-store rendezvous
  `vllm_dist_*`, multiprocessing's `pymp-*`): removed when the command ends (at the
  process's exit once multiprocessing uses it), and swept by the next command if the process
  was killed. Inductor's compile cache, which lives in the
  temp folder to be reused from run to run, stays where it was.
- `sweep_orphans(root, prefix)`: removes `prefix-PID*` entries whose process is gone (the
  temp folders above; server.py's weight copies in /dev/shm).

A launcher's own files (`accelerate launch`'s `torchelastic_*`) are made before oaif runs and
are not oaif's to remove.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = "oaif-tmp"
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
_REMOVED_AT_EXIT: set[Path] = set()   # this process's folders left to its exit (private_tempdir)


def sweep_orphans(root: str | Path, prefix: str) -> None:
    """Remove `prefix-PID` and `prefix-PID-*` entries of `root` whose process is gone."""
    for path in Path(root).glob(f"{prefix}-*"):
        pid = path.name[len(prefix) + 1:].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


@contextmanager
def private_tempdir() -> Iterator[Path]:
    """The process's temp folder, for itself (tempfile) and its children (TMPDIR), while the
    block runs; restored and removed after it. Libraries that cached the temp folder before
    (multiprocessing, once used) keep theirs: enter this first."""
    root = Path(tempfile.gettempdir())
    sweep_orphans(root, TEMP_PREFIX)
    path = root / f"{TEMP_PREFIX}-{os.getpid()}"
    path.mkdir(exist_ok=True)
    saved = tempfile.tempdir, os.environ.get("TMPDIR"), os.environ.get(INDUCTOR_CACHE)
    if saved[2] is None:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ[INDUCTOR_CACHE] = default_cache_dir()   # computed from the temp folder: pin it first
    tempfile.tempdir, os.environ["TMPDIR"] = str(path), str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved[0]
        for name, value in (("TMPDIR", saved[1]), (INDUCTOR_CACHE, saved[2])):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if any(path.glob("pymp-*")):
            # multiprocessing keeps its folder, and the listener that passes tensors' file
            # descriptors, for the life of the process: a second command in this process (a
            # script or a test calling cli.main again) uses them again. Removed at exit (once),
            # after multiprocessing's own clean-up of its folder (finalizers run high to low).
            if path not in _REMOVED_AT_EXIT:
                import multiprocessing.util

                multiprocessing.util.Finalize(None, shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                                              exitpriority=-200)
                _REMOVED_AT_EXIT.add(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
