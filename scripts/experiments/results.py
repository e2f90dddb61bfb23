"""What every experiment writes: a folder with `results.md` (the command that made it, how
long it took here, the tables and the plots) and one PNG per plot. Shared by the scripts
in scripts/experiments/ so that their folders read the same way."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD_HINT = "`bash scripts/demo.sh` builds models/tiny and models/smollm2-135m-instruct"


def check_model(model: str, key: str) -> None:
    """oaif's own check of a model reference, before anything is written, with the command
    that builds the bundled models: an experiment fails here, not minutes into its first arm."""
    from oaif.config import ConfigError
    from oaif.models import check_model as check

    try:
        check(model, key)
    except ConfigError as e:
        raise SystemExit(f"error: {e}\n{BUILD_HINT}") from None


def fmt(value, spec: str = ".3f") -> str:
    """A table cell: '-' for a missing value, numbers to `spec`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else format(value, spec)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float] | tuple[None, None]:
    """The 95% Wilson score interval of the proportion k / n (Wilson 1927): unlike the normal
    approximation it stays inside [0, 1] and is not zero-width at 0 / n or n / n, where small
    judges' rates sit. k may be fractional (a tie counted as half). (None, None) when n is 0."""
    if not n:
        return None, None
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # min / max: at 0 / n and n / n rounding would otherwise put p a hair outside its interval.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def fmt_ci(value, low, high, n: int, min_n: int = 1, unit: str = "pairs", spec: str = ".2f") -> str:
    """A table cell for an estimate with its interval, 'value [low, high]'; 'n/a (n pairs)' when
    fewer than min_n observations back it, so a rate over one pair does not read as a finding."""
    if n < min_n or value is None:
        return f"n/a ({n} {unit.removesuffix('s') if n == 1 else unit})"
    return f"{fmt(value, spec)} [{fmt(low, spec)}, {fmt(high, spec)}]"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells are formatted with fmt unless already strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paired_difference(diffs: list[float], z: float = 1.96) -> tuple[float, float, float] | tuple[None, None, None]:
    """The mean of per-item paired differences and its Wald 95% interval, mean ± z·σ/√n with σ²
    the items' variance over n. For items that are one pair of 0/1 outcomes each (d = −1, 0 or
    +1) it is the interval of a difference of paired proportions, (b − c)/n ± z·√(b + c − (b −
    c)²/n)/n, b and c the discordant counts. The item is the unit: results on the same prompt
    from several seeds are averaged into one difference per prompt first, since they are not
    independent draws."""
    if not diffs:
        return None, None, None
    n = len(diffs)
    mean = sum(diffs) / n
    half = z * math.sqrt(sum((d - mean) ** 2 for d in diffs) / n / n)
    return mean, mean - half, mean + half


def sign_test(diffs: list[float]) -> float:
    """Two-sided exact sign test of per-item paired differences (zeros left out): the chance
    of a split of the signs at least as uneven as this one if + and − were equally likely.
    For one pair of 0/1 outcomes per item it is McNemar's exact test."""
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    tail = sum(math.comb(up + down, k) for k in range(min(up, down) + 1)) / 2 ** (up + down)
    return min(1.0, 2 * tail)


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the values that are not None; std None below 2."""
    vs = [v for v in values if v is not None and not math.isnan(v)]
    if not vs:
        return None, None
    return statistics.fmean(vs), (statistics.stdev(vs) if len(vs) > 1 else None)


def mean_sd(values: list[float], spec: str = ".3f") -> str:
    """'mean ± sd' of the values (over seeds), or '-'."""
    m, s = mean_spread(values)
    return fmt(m, spec) if s is None else f"{fmt(m, spec)} ± {fmt(s, spec)}"


def nested_interval(groups: list[list[float]], resamples: int, seed: int = 0) -> tuple[float | None, float | None]:
    """95% percentile interval of the mean of every value, by a two-level bootstrap: draw the
    groups (seeds) with replacement, then the values (prompts) within each drawn group. A
    bootstrap over the values alone would hide how much the seeds differ."""
    groups = [g for g in groups if g]
    if not groups:
        return None, None
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [v for g in rng.choices(groups, k=len(groups)) for v in rng.choices(g, k=len(g))]
        means.append(sum(drawn) / len(drawn))
    means.sort()
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


RESAMPLES = 2000   # bootstrap draws behind every interval the experiments report


def with_interval(groups: list[list[float]], spec: str = ".3f") -> str:
    """'mean [low, high]': the mean of every value, its 95% interval over groups (seeds), then
    values within them (prompts); '-' when there is none."""
    lo, hi = nested_interval(groups, RESAMPLES)
    values = [v for g in groups for v in g]
    return f"{statistics.fmean(values):{spec}} [{lo:{spec}}, {hi:{spec}}]" if values else "-"


def prompt_scores(records: list[dict]) -> dict[str, float]:
    """Per prompt, the policy side's score in evaluation records (oaif.evaluation.compare): 1 a
    win, 0.5 a tie, 0 a loss; invalid judgments left out."""
    from oaif.evaluation import SCORE

    return {r["prompt_id"]: SCORE[r["outcome"]] for r in records if r["outcome"] in SCORE}


def interval_plot(path: Path, title: str, panels: list[tuple]) -> None:
    """Stacked panels, one row per group: a dot per seed (the mean of its values), the mean of
    every value (black) and its interval. Each panel is (x label, {group: (values per seed, low,
    high)}, reference x or None, log x)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sum(len(series) for _, series, *_ in panels)
    fig = Figure(figsize=(7, 0.9 * len(panels) + 0.32 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[len(s) + 1 for _, s, *_ in panels])[:, 0]
    for ax, (xlabel, series, reference, log) in zip(axes, panels):
        for y, (groups, low, high) in enumerate(series.values()):
            per_seed = [statistics.fmean(g) for g in groups if g]
            mean = statistics.fmean(v for g in groups for v in g)
            ax.plot(per_seed, [y] * len(per_seed), "o", color="C0", alpha=0.6, markersize=4)
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="s", color="black", markersize=4,
                        capsize=3)
        if reference is not None:
            ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
        if log:   # symmetric: a per-sample KL estimate can be at or below 0, which a plain log axis drops
            ax.set_xscale("symlog", linthresh=0.1)
        ax.set_yticks(range(len(series)), list(series), fontsize="small")
        ax.set_ylim(len(series) - 0.5, -0.5)   # the first group on top
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title(title)
    fig.savefig(path, dpi=100)


def line_plot(path: Path, title: str, xlabel: str, panels: list[tuple[str, dict]], reference: float | None = None
              ) -> None:
    """Stacked panels sharing x; each panel is (y label, {series label: (x, y) or (x, y, low, high)}),
    where low/high are drawn as a shaded band (e.g. mean ± sd over seeds). None is a gap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nan = lambda vs: [math.nan if v is None else float(v) for v in vs]  # noqa: E731
    fig = Figure(figsize=(7, 1.2 + 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)   # the Figure API, not pyplot: Agg renders without a display
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels):
        for label, xy in series.items():
            (line,) = ax.plot(xy[0], nan(xy[1]), marker="o", markersize=3, label=label)
            if len(xy) == 4:
                ax.fill_between(xy[0], nan(xy[2]), nan(xy[3]), alpha=0.2, color=line.get_color())
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    fig.savefig(path, dpi=100)


def bar_plot(path: Path, title: str, groups: list[str], panels: list[tuple]) -> None:
    """Stacked panels of grouped bars: each panel is (y label, {series label: {group: value}})
    or (y label, series, {reference label: y}) with dashed reference lines. A group gets a bar
    for each series that has it (absent: that series does not apply there); each bar is labelled
    with its value. A value is a number; (value, low, high), drawn with its interval as an error
    bar; None (measured, but undefined), marked 'n/a'; or a string, no bar and the string as its
    label (e.g. 'n/a (1 pair)' for a rate too thin to draw)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(max(7, 1.3 * len(groups) + 1), 1.4 + 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series, *refs) in zip(axes, panels):
        refs = refs[0] if refs else {}
        colors = {label: f"C{k}" for k, label in enumerate(series)}
        top = max([y for values in series.values() for v in values.values()
                   for y in (v if isinstance(v, tuple) else (v,)) if isinstance(y, (int, float))]
                  + list(refs.values()) + [1e-9])
        for g, group in enumerate(groups):
            present = [label for label in series if group in series[label]]
            width = 0.8 / max(1, len(present))
            for k, label in enumerate(present):
                x, v = g + (k - (len(present) - 1) / 2) * width, series[label][group]
                v, low, high = v if isinstance(v, tuple) else (v, None, None)
                height = v if isinstance(v, (int, float)) else 0
                ax.bar(x, height, width, color=colors[label])
                if low is not None:
                    # max: a bootstrap interval need not hold its mean, but the bar stays where the value is.
                    ax.errorbar(x, height, [[max(0, height - low)], [max(0, high - height)]], color="black",
                                linewidth=0.8, capsize=2)
                text = "n/a" if v is None else v if isinstance(v, str) else f"{v:.2f}"
                ax.text(x, height if high is None else high, text, ha="center", va="bottom", fontsize=6,
                        rotation=90 if len(present) > 2 or isinstance(v, str) else 0)
        lines = [ax.axhline(y, color="grey", linestyle=style, linewidth=1, label=name)
                 for (name, y), style in zip(refs.items(), ("--", ":", "-."))]
        ax.set_ylim(0, top * 1.25)   # room for the value labels
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=[Patch(color=c, label=label) for label, c in colors.items()] + lines, fontsize="x-small",
                  ncol=3)
    axes[0].set_title(title)
    axes[-1].set_xticks(range(len(groups)), [textwrap.fill(g, 18) for g in groups], fontsize="small")
    fig.savefig(path, dpi=100)


class Results:
    """An experiment's output folder. Sections are added as the experiment goes; write()
    puts results.md beside the plots, with the command and the wall time."""

    def __init__(self, out: Path, title: str):
        self.out, self.title, self.t0 = Path(out), title, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections: list[str] = []

    def add(self, text: str) -> None:
        self.sections.append(text.strip())

    def plot(self, file: str, title: str, xlabel: str, panels: list[tuple[str, dict]],
             reference: float | None = None) -> None:
        line_plot(self.out / file, title, xlabel, panels, reference)
        self.add(f"![{title}]({file})")

    def bars(self, file: str, title: str, groups: list[str], panels: list[tuple]) -> None:
        bar_plot(self.out / file, title, groups, panels)
        self.add(f"![{title}]({file})")

    def write(self, made: str | None = None) -> Path:
        """made: how the results were made, for results put together from several invocations
        (default: this invocation's command and wall time)."""
        minutes = (time.perf_counter() - self.t0) / 60
        script = Path(sys.argv[0]).resolve()
        script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        command = " ".join([".venv/bin/python", str(script), *sys.argv[1:]])
        made = made or (f"`{command}`: {minutes:.1f} min on {os.cpu_count()} {platform.machine()} CPU "
                        f"cores ({time.strftime('%Y-%m-%d')}).")
        head = f"# {self.title}\n\n{made}"
        path = self.out / "results.md"
        tmp = path.with_suffix(".md.tmp")   # written whole: a crash leaves the last complete file
        tmp.write_text("\n\n".join([head, *self.sections]) + "\n")
        tmp.replace(path)
        return path
