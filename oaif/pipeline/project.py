"""`oaif init DIR`: a project folder of your own, to run the loop from anywhere.

    oaif init myproj [--overwrite]
    cd myproj && oaif run config.yaml policy.model=YOUR_MODEL

DIR gets a commented config for your model (a LoRA adapter at a safe learning rate; the
`rules` judge, which needs no model, and an OpenAI-compatible judge to switch to), a copy of
the bundled `concise` constitution to edit, a prompt set, and run.py, the same loop from
Python with a judge function. DIR is new (or with --overwrite an earlier `oaif init`'s) and
written whole (oaif/outputs.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from oaif import outputs
from oaif.bundled import DATA, data_path

KIND = "project"


def init_project(out: str | Path, overwrite: bool = False) -> Path:
    """Writes the project folder (module docstring); returns its path."""
    def fill(staging: Path) -> None:
        for name in ("config.yaml", "run.py", "README.md"):
            shutil.copyfile(DATA / "project" / name, staging / name)
        shutil.copyfile(data_path("concise"), staging / "constitution.yaml")
        shutil.copyfile(data_path("tiny_prompts"), staging / "prompts.jsonl")

    return outputs.write_folder(out, KIND, fill, overwrite=overwrite, parents=True)

