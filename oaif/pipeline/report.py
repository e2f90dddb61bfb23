"""Plots and one self-contained HTML page from a run directory.

    oaif report runs/NAME                 writes runs/NAME/report/ (report.html and the PNGs)
    oaif report runs/NAME --out DIR [--overwrite]

Reads only the run's records (config.yaml, metrics.jsonl, rounds/*/{samples,judgments}.jsonl),
so it works on a finished run and on one still running, without touching the trainer. The
page embeds its images (base64) and needs no JavaScript and no network: it can be mailed or
attached to an issue as one file. Responses are model output and are escaped like any other
untrusted text.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from oaif import outputs
from oaif.alarms import Trip
from oaif.faults import crash_point
from oaif.records import read_jsonl

KIND = "report"


@dataclass(frozen=True)
class Series:
    key: str                                # the metrics.jsonl key drawn
    label: str
    interval: tuple[str, str] | None = None  # keys of a 95% interval, drawn as error bars


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    panels: tuple[tuple[str, tuple[Series, ...]], ...]   # (y-axis label, series) per panel, stacked
    section: str                            # the page's heading it is shown under (SECTIONS)
    reference: float | None = None          # a dashed horizontal line (0.5: no better than the start)


SECTIONS = ("Training", "Judge", "Hacking", "Evaluation")
TRAINING, JUDGE, HACKING, EVALUATION = SECTIONS

PLOTS = (
    Plot("length.png", "Mean response length", (("tokens", (Series("generate/mean_length", "mean length"),)),),
         TRAINING),
    Plot("loss.png", "Training loss", (("loss", (Series("train/loss", "loss"),)),), TRAINING),
    Plot("reward.png", "Implicit reward: accuracy and margin", (
        ("accuracy", (Series("train/reward_accuracy", "reward accuracy"),)),
        ("margin", (Series("train/reward_margin", "reward margin"),))), TRAINING),
    Plot("kl.png", "KL to the reference (sampled pairs)", (("nats", (Series("train/kl_to_ref", "KL to ref"),)),),
         TRAINING),
    Plot("throughput.png", "Throughput", (("kept pairs / s", (Series("round/pairs_per_s", "pairs/s"),)),), TRAINING),
    Plot("annotator.png", "Annotator: both-orders agreement and position bias", (("share of pairs / answers", (
        Series("annotate/order_agreement", "order agreement"),
        Series("annotate/invalid_rate", "invalid rate"),
        Series("annotate/first_position_rate", "first-position rate"))),), JUDGE),
    # How the judge decides (oaif/annotate/judge.py judge_health); the cost panels only for API judges.
    Plot("judge.png", "Judge: flips with the order, ties, length preference, cost", (
        ("share", (Series("judge/flip_rate", "flip rate (of decisive pairs)"),
                   Series("judge/tie_rate", "tie rate"),
                   Series("judge/longer_chosen_rate", "longer chosen (kept pairs)"))),
        ("ΔP(A better) / 100 tokens", (Series("judge/length_slope", "length slope"),)),
        ("tokens / kept pair", (Series("judge/tokens_per_pair", "API tokens per pair"),)),
        ("cost / kept pair", (Series("judge/cost_per_pair", "cost per pair"),))), JUDGE),
    # annotate.canary: labelled pairs re-judged every N rounds (points only on those rounds).
    Plot("judge_canary.png", "Judge: canary pairs (labelled, re-judged without the cache)", (("share of canary pairs", (
        Series("judge/canary_accuracy", "canary accuracy"),
        Series("judge/canary_change", "verdict changed since the first check"))),), JUDGE),
    # Is the policy gaming its judge? The judge it trains on against the independent one on the
    # same held-out answers (eval.train_judge), and how far it moved: KL and length.
    Plot("hacking.png", "Hacking: the training judge against the independent one, KL, length", (
        ("win rate vs start", (
            Series("eval/train_judge_win_rate", "training judge", ("eval/train_judge_win_rate_ci_low",
                                                                   "eval/train_judge_win_rate_ci_high")),
            Series("eval/win_rate_vs_ref", "independent judge", ("eval/win_rate_ci_low", "eval/win_rate_ci_high")),
            Series("eval/live_train_judge_win_rate", "training judge, live slice"),
            Series("eval/live_win_rate", "independent judge, live slice"))),
        ("nats", (Series("train/kl_to_ref", "KL to start (sampled)"), Series("eval/kl_to_ref", "KL to start (held out)"))),
        ("tokens", (Series("generate/mean_length", "mean length (sampled)"),
                    Series("eval/mean_length", "mean length (held out)")))), HACKING, reference=0.5),
    Plot("eval.png", "Held-out evaluation against the start", (("win rate", (
        Series("eval/win_rate_vs_ref", "win rate (95% interval)", ("eval/win_rate_ci_low", "eval/win_rate_ci_high")),
        Series("eval/live_win_rate", "live win rate, a slice of the prompts (95% interval)",
               ("eval/live_win_rate_ci_low", "eval/live_win_rate_ci_high")),
        Series("eval/lc_win_rate_vs_ref", "length-controlled win rate"))),), EVALUATION, reference=0.5),
)


def values(rows: list[dict], key: str) -> list[float]:
    """The key per round; NaN where a round lacks it or holds null (matplotlib leaves a gap
    there: a round that kept no pairs did not have a loss of 0)."""
    return [math.nan if row.get(key) is None else float(row[key]) for row in rows]


def present(rows: list[dict], key: str) -> bool:
    return any(row.get(key) is not None for row in rows)


def make_plots(rows: list[dict], out: Path) -> dict[str, dict[str, dict]]:
    """One PNG per plot in PLOTS whose metrics the run has; plots without them are skipped.
    Returns what each figure holds, read back from its artists before saving:
    {file: {key: {"x": rounds, "y": values (NaN = gap), "low"/"high": interval ends}}}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [row["round"] for row in rows]
    drawn = {}
    for plot in PLOTS:
        panels = [(ylabel, [s for s in series if present(rows, s.key)]) for ylabel, series in plot.panels]
        panels = [(ylabel, series) for ylabel, series in panels if series]
        if not panels:
            continue
        # The Figure API, not pyplot: no global state, and Agg renders without a display.
        fig = Figure(figsize=(7, 1.2 + 2.3 * len(panels)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        drawn[plot.file] = {}
        for ax, (ylabel, series) in zip(axes, panels):
            for s in series:
                y = values(rows, s.key)
                if s.interval:
                    low, high = values(rows, s.interval[0]), values(rows, s.interval[1])
                    below, above = [v - lo for v, lo in zip(y, low)], [hi - v for v, hi in zip(y, high)]
                    # Error bars, not a band: evaluation rounds are often isolated points.
                    bars = ax.errorbar(rounds, y, yerr=[below, above], marker="o", capsize=4, label=s.label)
                    line = bars.lines[0]
                    # One vertical segment per round, empty where the round has no interval.
                    ends = [seg[:, 1] if len(seg) else [math.nan] for seg in bars.lines[2][0].get_segments()]
                    drawn[plot.file][s.key] = {"low": [float(min(e)) for e in ends],
                                               "high": [float(max(e)) for e in ends]}
                else:
                    (line,) = ax.plot(rounds, y, marker="o", label=s.label)
                drawn[plot.file].setdefault(s.key, {}).update(
                    x=[float(v) for v in line.get_xdata()], y=[float(v) for v in line.get_ydata()])
            if plot.reference is not None:
                ax.axhline(plot.reference, color="grey", linestyle="--", linewidth=1)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(series) > 1:   # beside the axes: inside, it hides lines that fill the range
                ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
        axes[0].set_title(plot.title)
        axes[-1].set_xlabel("round")
        # Every plot spans all rounds, so that one with sparse points (evaluation) lines up with the rest.
        pad = max(0.25, 0.03 * (max(rounds) - min(rounds)))
        axes[-1].set_xlim(min(rounds) - pad, max(rounds) + pad)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.savefig(out / plot.file, dpi=100)
    return drawn


def read_run(run_dir: Path) -> tuple[str, list[dict]]:
    """(config.yaml's text, metrics rows), with errors that say what is wrong and what to do."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml); give the folder `oaif run` made, "
                         f"<output_dir>/<name>, e.g. runs/tiny-concise")
    metrics = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics) if metrics.is_file() else []
    if not rows:
        raise ValueError(f"{metrics}: no rounds recorded yet; run `oaif report {run_dir}` again once the run "
                         f"has finished its first round")
    return config.read_text(encoding="utf-8"), rows


def round_pairs(round_dir: Path, limit: int) -> tuple[list[tuple[dict, dict, dict]], int]:
    """The round's first `limit` judgments with their two samples, and the number of judgments.
    Judgments come in sample order, so each takes the next unused sample of its prompt and
    index: a prompt drawn twice in one round is matched correctly too."""
    judgments_file, samples_file = round_dir / "judgments.jsonl", round_dir / "samples.jsonl"
    if not (judgments_file.is_file() and samples_file.is_file()):
        return [], 0   # a round still in flight
    judgments = read_jsonl(judgments_file)
    unused = defaultdict(deque)
    for s in read_jsonl(samples_file):
        unused[s["prompt_id"], s["index"]].append(s)
    shown = []
    for j in judgments[:limit]:
        a, b = unused[j["prompt_id"], j["a"]], unused[j["prompt_id"], j["b"]]
        if not (a and b):
            raise ValueError(f"{judgments_file}: judgment of prompt {j['prompt_id']} names samples {j['a']} and "
                             f"{j['b']} that {samples_file} lacks; the round's files do not belong together")
        shown.append((j, a.popleft(), b.popleft()))
    return shown, len(judgments)


def fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def summary(rows: list[dict]) -> str:
    """One line: rounds, policy version, length first to last, pairs kept, last evaluation."""
    last = rows[-1]
    parts = [f"{len(rows)} rounds (last: {last['round']}), policy version {last['policy_version']}"]
    lengths = [v for v in values(rows, "generate/mean_length") if not math.isnan(v)]
    if lengths:
        parts.append(f"mean response length {lengths[0]:.1f} → {lengths[-1]:.1f} tokens")
    kept, dropped = sum(r["pairs_kept"] for r in rows), sum(r["pairs_dropped"] for r in rows)
    parts.append(f"{kept} of {kept + dropped} pairs kept")
    evals = [r for r in rows if r.get("eval/win_rate_vs_ref") is not None]
    if evals:
        e = evals[-1]
        parts.append(f"win rate vs start {fmt(e['eval/win_rate_vs_ref'])} [{fmt(e.get('eval/win_rate_ci_low'))}, "
                     f"{fmt(e.get('eval/win_rate_ci_high'))}] after round {e['round']}")
    return "; ".join(parts)


def alarm_lines(run_dir: Path) -> list[str]:
    """Every alarm the run tripped (oaif/alarms.py), round by round: a round that stopped the
    run has its trips but no metrics line."""
    return [Trip(**t).line() for f in sorted(run_dir.glob("rounds/*/alarms.jsonl")) for t in read_jsonl(f)]


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def pair_html(j: dict, a: dict, b: dict) -> str:
    """One judged pair: the conversation, both responses, both orders, the verdict and who judged."""
    conversation = "".join(f'<div class="msg"><b>{esc(m["role"])}</b><div class="text">{esc(m["content"])}</div></div>'
                           for m in a["messages"])
    winner = {"a": "A", "b": "B"}.get(j["verdict"])
    responses = "".join(
        f'<div class="resp{" chosen" if winner == side else ""}"><b>response {side}</b> '
        f'({len(s["token_ids"])} tokens, {esc(s["finish_reason"])}){" · chosen" if winner == side else ""}'
        f'<div class="text">{esc(s["text"])}</div></div>' for side, s in (("A", a), ("B", b)))
    orders = "".join(
        f'<tr><td>{esc(o["first"]).upper()} first</td><td>{fmt(o["p_first"])}</td><td class="text">{esc(o["raw"])}</td>'
        f'<td>{fmt(o.get("label_mass"))}</td></tr>' for o in j["orders"])
    orders = (f'<table><tr><th>order</th><th>P(first better)</th><th>raw answer</th><th>label mass</th></tr>{orders}'
              f'</table>' if orders else "<p>not judged: the two responses are identical</p>")
    # With annotate.principles=sample the backend draws one principle per pair but the judgment
    # does not record it (yet); a judgment that carries a "principles" list shows it.
    principles = "".join(f"<li>{esc(p)}</li>" for p in j.get("principles") or [])
    return (f'<div class="pair"><p class="meta">prompt {esc(j["prompt_id"])} · verdict <b>{esc(j["verdict"])}</b> · '
            f'P(A better) {fmt(j["p_a"])} · judge {esc(j["backend"])} ({esc(j["model"])}) · constitution '
            f'{esc(j["constitution"])} <code>{esc(j["constitution_hash"])}</code></p>'
            f'{"<p>principle:</p><ul>" + principles + "</ul>" if principles else ""}'
            f'{conversation}<div class="pairs">{responses}</div>{orders}</div>')


STYLE = """
body { font-family: sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em; color: #222; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 0.5em; }
img { max-width: 100%; }
.text { white-space: pre-wrap; font-family: monospace; font-size: 0.9em; overflow-wrap: anywhere; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.pair { border: 1px solid #ccc; border-radius: 4px; padding: 0.6em; margin: 0.8em 0; }
.pairs { display: flex; gap: 0.8em; } .resp { flex: 1; background: #f6f6f6; padding: 0.5em; }
.chosen { background: #e3f4e3; } .msg { margin-bottom: 0.5em; } .meta { color: #555; }
table { border-collapse: collapse; margin-top: 0.5em; } td, th { border: 1px solid #ddd; padding: 0.2em 0.5em; }
summary { cursor: pointer; font-weight: bold; margin: 0.4em 0; }
"""


def page(name: str, rows: list[dict], config_text: str, images: dict[str, bytes], run_dir: Path,
         pairs_per_round: int) -> str:
    """The whole HTML page. Rounds fold with <details> (native HTML, no script needed)."""
    alarms = "".join(f"<li>{esc(line)}</li>" for line in alarm_lines(run_dir))
    sections = []
    for section in SECTIONS:   # a heading per section that has a plot
        figures = "".join(f'<img alt="{esc(p.file)}" src="data:image/png;base64,{base64.b64encode(images[p.file]).decode()}">'
                          for p in PLOTS if p.section == section and p.file in images)
        if figures:
            sections.append(f'<h2>{section}</h2>\n<div class="plots">{figures}</div>\n')
    rounds = []
    for row in rows:
        shown, total = round_pairs(run_dir / "rounds" / f"{row['round']:06d}", pairs_per_round)
        head = (f"round {row['round']} · kept {row['pairs_kept']} / dropped {row['pairs_dropped']} · mean length "
                f"{fmt(row.get('generate/mean_length'), '.1f')} · showing {len(shown)} of {total} pairs")
        rounds.append(f'<details{" open" if not rounds else ""}><summary>{esc(head)}</summary>'
                      f'{"".join(pair_html(*p) for p in shown)}</details>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(name)} · oaif report</title>'
            f'<style>{STYLE}</style></head><body>\n<h1>{esc(name)}</h1>\n<p class="summary">{esc(summary(rows))}</p>\n'
            f'{"<h2>Alarms</h2><ul>" + alarms + "</ul>" if alarms else ""}\n'
            f'{"".join(sections)}'
            f'<h2>Sample pairs</h2>\n{"".join(rounds)}\n'
            f'<h2>Config</h2>\n<pre>{esc(config_text)}</pre>\n</body></html>\n')


def write_report(run_dir: str | Path, out: str | Path | None = None, pairs_per_round: int = 4,
                 overwrite: bool = False) -> Path:
    """Write the plots and report.html into `out`; returns the page. `out` is new, or with
    overwrite an earlier oaif report (oaif/outputs.py). The default, RUN_DIR/report, is the
    run's own: its earlier report is replaced without asking (one from before outputs carried
    a marker is known by its file names). Written into a temp folder beside `out` and renamed
    into place, so a reader sees the previous report or the new one, never half of one."""
    if pairs_per_round < 0:
        raise ValueError(f"--pairs {pairs_per_round}: give the number of pairs to show per round (0 or more)")
    run_dir = Path(run_dir)
    config_text, rows = read_run(run_dir)
    legacy = ()
    if out is None:
        out, overwrite, legacy = run_dir / "report", True, {"report.html", *(p.file for p in PLOTS)}
    out = Path(out)
    outputs.check(out, KIND, folder=True, overwrite=overwrite, legacy=legacy)
    raw = yaml.safe_load(config_text)
    name = raw["name"] if isinstance(raw, dict) and raw.get("name") else run_dir.name

    def fill(staging: Path) -> None:
        make_plots(rows, staging)
        crash_point("report")
        images = {p.file: (staging / p.file).read_bytes() for p in PLOTS if (staging / p.file).is_file()}
        (staging / "report.html").write_text(page(name, rows, config_text, images, run_dir, pairs_per_round),
                                             encoding="utf-8")   # what the page's <meta charset> says

    outputs.write_folder(out, KIND, fill, overwrite=overwrite, legacy=legacy, crash="report")
    return out / "report.html"
