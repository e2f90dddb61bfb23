"""What a run shows, and where: the terminal gets oaif's own lines (the round table, its
warnings) and, on a terminal, progress bars; RUN_DIR/run.log gets everything, oaif's lines
and the libraries' log records and Python warnings (vLLM, transformers, torch, ...), which
reach the terminal only with `verbose: true`.

Library records that arrive before the run directory exists wait in memory and are written
to run.log when it is there, so nothing is lost to a quiet terminal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

# The loggers that libraries print to the terminal through their own handlers; their
# records are sent up to the root logger instead, where RunLog takes them.
LIBRARY_LOGGERS = ("vllm", "transformers", "accelerate", "peft", "datasets", "torch", "httpx", "huggingface_hub")


class RunLog(logging.Handler):
    """The run's log file: oaif's lines (write) and every library record (emit)."""

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO)
        self.verbose, self.pending, self.file = verbose, [], None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.write(line)
        if self.verbose:
            print(line, file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if self.file is None:
            if self.pending is not None:
                self.pending.append(line)
            return
        self.file.write(line + "\n")
        self.file.flush()

    def open(self, path: Path | None) -> None:
        """Start writing to `path` (None: another rank's process, which keeps no log)."""
        if path is not None:
            self.file = open(path, "a")
            for line in self.pending:
                self.write(line)
        self.pending = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


class LibraryLogs:
    """Routes the libraries' records and Python warnings to a RunLog for the life of a run,
    and puts things back as they were after it."""

    def __init__(self, verbose: bool):
        from transformers.utils import logging as hf_logging

        self.handler = RunLog(verbose)
        root = logging.getLogger()
        self.saved = (root.level, {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
                                   for name in LIBRARY_LOGGERS})
        # vLLM configures its own terminal handler when first imported unless told not to;
        # when it was imported already, its handler is taken off below like the others'.
        os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
        hf_logging.disable_progress_bar()   # per-save "Writing model shards" bars would break up the table
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"   # and the export's "Saving the dataset" ones
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for h in logger.handlers[:]:
                logger.removeHandler(h)
            logger.propagate = True
        root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        logging.captureWarnings(True)

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        level, loggers = self.saved
        root.setLevel(level)
        for name, (handlers, propagate) in loggers.items():
            logger = logging.getLogger(name)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        logging.captureWarnings(False)
        self.handler.close()


class Progress:
    """A bar for the run's rounds and one for the stage in flight, with counts and rates;
    nothing when stderr is not a terminal (CI, a file), where the round table says enough."""

    def __init__(self, first: int, rounds: int, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.run = self.stage = None
        if self.enabled:
            from tqdm import tqdm

            self.run = tqdm(total=rounds, initial=first, desc="rounds", unit="round", position=0, dynamic_ncols=True)
            self.stage = tqdm(total=0, desc="", position=1, leave=False, dynamic_ncols=True)

    def start(self, name: str, total: int, unit: str) -> None:
        if self.stage is not None:
            self.stage.reset(total=total)
            self.stage.unit = unit
            self.stage.set_description(name)

    def advance(self, n: int = 1) -> None:
        if self.stage is not None:
            self.stage.update(n)

    def round_done(self) -> None:
        if self.run is not None:
            self.run.update(1)

    def write(self, line: str) -> None:
        """A line above the bars (print would tear them)."""
        if self.run is None:
            print(line, flush=True)
        else:
            self.run.write(line)

    def close(self) -> None:
        for bar in (self.stage, self.run):
            if bar is not None:
                bar.close()
        self.run = self.stage = None


# (metric, column title, format) of the line printed per round.
COLUMNS = [("round", "round", "d"), ("pairs_kept", "kept", "d"), ("pairs_dropped", "dropped", "d"),
           ("generate/mean_length", "mean_len", ".1f"), ("train/loss", "loss", ".4f"),
           ("train/reward_accuracy", "reward_acc", ".2f"), ("round/seconds", "seconds", ".1f")]


def format_row(metrics: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        v = metrics.get(key)
        cells.append(f"{format(v, fmt) if v is not None else '-':>{max(len(title), 6)}}")
    return "  ".join(cells)


def header() -> str:
    return "  ".join(f"{title:>{max(len(title), 6)}}" for _, title, _ in COLUMNS)


def done_line(rounds: int, first: int, policy_version: int, lengths: list, run_dir: Path) -> str:
    """The line a finished run ends with. lengths: each round's mean response length (None:
    every prompt of a round was too long)."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"done: {rounds} rounds" + (f" (resumed after round {first - 1})" if first else "")
            + f", policy version {policy_version}; mean response length {fmt(lengths[0])} -> "
            f"{fmt(lengths[-1])} tokens; records and metrics.jsonl in {run_dir}")


STOPPED_AT_ONCE = "oaif: stopped at once; the last checkpoint is where `oaif resume` continues"


class StoppedAtOnce(KeyboardInterrupt):
    """The second signal; its line is already printed (at the signal, not after the engines and
    servers close: a launcher may kill this process while it closes them)."""


class GracefulStop:
    """SIGINT / SIGTERM: finish the round in flight, checkpoint it, stop cleanly (exit 0) with
    a resume line; a second signal stops at once (the engines and servers are still closed).
    Installed on every rank for the rounds of a run (stop_agreed makes the ranks stop together)
    and restored after them."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        if self.signal is not None:
            print(STOPPED_AT_ONCE, file=sys.stderr, flush=True)
            raise StoppedAtOnce(f"second {signal.Signals(signum).name}")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this round, then a checkpoint; send it again to stop at once",
              file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunConsole:
    """A run's own output, rank 0 only: its lines to the terminal (or a script's log function),
    above the progress bars while rounds run, and to run.log; the libraries' records to
    run.log alone; the round's metrics to the trackers."""

    def __init__(self, log=print):
        self.print, self.main = log, True
        self.logs: LibraryLogs | None = None
        self.progress = Progress(0, 0, enabled=False)
        self.trackers = None   # tracking.Trackers once the run directory exists

    def open(self, verbose: bool, main: bool) -> None:
        self.logs, self.main = LibraryLogs(verbose), main

    def line(self, text: str) -> None:
        if not self.main:
            return
        if self.progress.enabled:
            self.progress.write(text)
        else:
            self.print(text)
        if self.logs is not None:
            self.logs.handler.write(text)

    def bars(self, first: int, rounds: int) -> None:
        """Bars decorate the default terminal output; a script's own log function gets plain lines."""
        self.progress = Progress(first, rounds, enabled=self.main and self.print is print and sys.stderr.isatty())

    def end_bars(self) -> None:
        self.progress.close()
        self.progress = Progress(0, 0, enabled=False)

    def round_done(self, metrics: dict, table: list[list[str]], notes: list[str]) -> None:
        """A finished round: its metrics and sample table to the trackers, its row and notes
        to the terminal."""
        if self.trackers is not None:
            self.trackers.log(metrics, table)
        self.progress.round_done()
        for line in [format_row(metrics), *notes]:
            self.line(line)

    def close(self, error: BaseException | None = None) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.logs is not None:
            if error is not None and self.main:   # the terminal gets it from the caller; the log keeps it
                self.logs.handler.write(f"oaif: error: {type(error).__name__}: {error}")
            self.logs.close()
            self.logs = None
