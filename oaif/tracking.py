"""Experiment trackers (`report_to`): each round's metrics and a small sample table go to
TensorBoard, Weights & Biases or Trackio, through the libraries directly. Each is an
optional extra (pip install 'oaif[tensorboard]', ...); a missing one is named before the
run starts. The same sample table is written to RUN_DIR/rounds/NNNNNN/samples.md.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path

from oaif.config import ConfigError, RunConfig, to_dict
from oaif.records import Judgment, Sample

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
TABLE_ROWS = 8   # pairs per round in the sample table
COLUMNS = ["prompt", "response a", "response b", "p(a) a first", "p(a) b first", "verdict"]


def check_trackers(cfg: RunConfig) -> None:
    missing = []
    for tracker in cfg.report_to:
        try:
            importlib.import_module(PACKAGES[tracker])
        except ImportError:
            missing.append(tracker)
    if missing:
        raise ConfigError(f"report_to: {', '.join(missing)} is not installed: pip install "
                          + " ".join(f"'oaif[{t}]'" for t in missing))


def sample_table(samples: list[Sample], judgments: list[Judgment]) -> list[list[str]]:
    """The round's first judged pairs: prompt, both responses, P(a better) as each order
    answered it, verdict. What users look at first when a run goes wrong."""
    by_key = {(s.prompt_id, s.index): s for s in samples}
    rows = []
    for j in judgments[:TABLE_ROWS]:
        a, b = by_key[j.prompt_id, j.a], by_key[j.prompt_id, j.b]
        orders = {o.first: o.p_first for o in j.orders}
        p_a_first = orders.get("a")
        p_b_first = orders.get("b")
        rows.append([a.messages[-1]["content"], a.text, b.text,
                     "-" if p_a_first is None else f"{p_a_first:.2f}",
                     "-" if p_b_first is None else f"{1 - p_b_first:.2f}", j.verdict])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    cell = lambda text: text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]) + "\n"


class Trackers:
    """The configured trackers of one run (rank 0). log() takes a round's metrics line."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.writers = {}
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writers["tensorboard"] = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in cfg.report_to:
            import wandb

            # The run directory names the wandb run, so a resumed run continues the same one.
            place = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
            self.writers["wandb"] = wandb.init(project=cfg.tracking_project, name=cfg.name, dir=str(run_dir),
                                               id=f"{cfg.name}-{place}", resume="allow", config=to_dict(cfg))
        if "trackio" in cfg.report_to:
            import trackio

            self.writers["trackio"] = trackio.init(project=cfg.tracking_project, name=cfg.name, config=to_dict(cfg),
                                                   resume="allow")

    def log(self, metrics: dict, table: list[list[str]]) -> None:
        step = metrics["round"]
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and k != "round"}
        if tb := self.writers.get("tensorboard"):
            for k, v in scalars.items():
                tb.add_scalar(k, v, step)
            tb.add_text("samples", markdown_table(table), step)
            tb.flush()
        if run := self.writers.get("wandb"):
            import wandb

            run.log({**scalars, "samples": wandb.Table(columns=COLUMNS, data=table)}, step=step)
        if "trackio" in self.writers:
            import trackio

            trackio.log({**scalars, "samples": trackio.Table(columns=COLUMNS, data=table)}, step=step)

    def close(self) -> None:
        if tb := self.writers.get("tensorboard"):
            tb.close()
        if run := self.writers.get("wandb"):
            run.finish()
        if "trackio" in self.writers:
            import trackio

            trackio.finish()
        self.writers = {}
