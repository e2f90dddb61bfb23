"""The data that ships inside oaif: constitutions, judge and critique templates, prompt sets.

A config names one by name (`annotate.constitution: concise`, `prompts: tiny_prompts`) or by
path. A name (no folder, no suffix) is the bundled file of that name, wherever the command
runs; a path is a file of yours, relative to the config file's folder or to the working
folder; a path as it is in oaif's source tree (`constitutions/concise.yaml`) that does not
exist where you run falls back to the bundled copy. `oaif constitutions` lists the bundled
constitutions.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
KINDS = ("constitutions", "prompts")


def bundled(kind: str) -> list[Path]:
    """The bundled files of one kind ("constitutions" or "prompts"), by name."""
    return sorted(p for p in (DATA / kind).iterdir() if p.is_file() and p.name != "README.md")


def is_name(path: str | Path) -> bool:
    """A bundled file's name: no folder, no suffix ('concise', not 'concise.yaml')."""
    p = Path(path)
    return p.name == str(path) and not p.suffix


def data_path(path: str | Path) -> Path:
    """The file a config names (see the module docstring); a name or path that matches nothing
    comes back as it is, for its reader to say it is missing."""
    p = Path(path)
    if is_name(path):   # the bundled file
        found = [f for kind in KINDS for f in bundled(kind) if f.stem == p.name]
        if len(found) == 1:
            return found[0]
    if p.exists() or p.is_absolute():
        return p
    if (DATA / p).is_file():   # a path of oaif's source tree, run from elsewhere
        return DATA / p
    return p


def resolve_against(folder: Path, path: str) -> str:
    """A path in a config file, relative to the file's folder when it is there; a name or a
    path found nowhere there is left for data_path (and the working folder)."""
    p = Path(path)
    if not path or p.is_absolute() or is_name(path):
        return path
    return str(folder / p) if (folder / p).exists() else path
