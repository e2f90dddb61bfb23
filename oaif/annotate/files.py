"""`oaif annotate`: judge pairs from a file, outside the loop, with a config's annotator.

    oaif annotate pairs.jsonl --out judged.jsonl configs/tiny_cpu.yaml annotate.backend=vllm [--overwrite]

Input lines: {"prompt": "text" or [chat messages], "a": "...", "b": "..."}, optionally
"references" (accepted answers, for the `matches_reference` rule) and "correct" ("a" or
"b": a labelled check set, whose accuracy is then reported); other fields are kept. Output
lines: the input plus `verdict` (a, b, tie or invalid; `reason` says whether a tie came from
the judge, from the two orders disagreeing, or from identical responses),
`p_a` (P(a better), averaged over both orders) and each order's probability and raw output.
Use it to try a constitution on a few examples before training with it. The output file is
new, or with --overwrite an earlier one oaif wrote (oaif/outputs.py), checked before judging.

Canary pairs (annotate.canary) are such a labelled file, re-judged every N rounds of a run by
the run's own annotator with its judgment cache bypassed (Canary): a constitution edit, a
judge model swapped behind an API or a template that breaks the judge shows as a drop in
judge/canary_accuracy. `oaif annotate` judges them too when a config turns them on.
"""

from __future__ import annotations

from pathlib import Path

from oaif import outputs
from oaif.annotate.judge import injection_attempts, judge_pairs, judgment_metrics, label_mass_warning
from oaif.annotate.backends import build_annotator, check_inputs, with_python_annotator
from oaif.annotate.base import Annotator
from oaif.annotate.cache import uncached
from oaif.bundled import DATA, data_path, is_name
from oaif.config import AnnotateConfig, RunConfig
from oaif.constitution import load_constitution
from oaif.records import Sample, is_chat, read_jsonl

KIND = "annotate output"
VERDICT = {"a": "a", "b": "b", "tie": "tie", "disagree": "tie", "identical": "tie", "invalid": "invalid"}


def read_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    rows = read_jsonl(path)
    check_pair_rows(rows, lambda n: f"{path}:{n}")
    if not rows:
        raise ValueError(f"{path}: no pairs")
    return rows


def check_pair_rows(rows: list[dict], where) -> None:
    """where(n) names row n (1-based) in the errors."""
    for n, row in enumerate(rows, 1):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) or is_chat(prompt)):
            raise ValueError(f"{where(n)}: 'prompt' must be a string or a list of {{role, content}} messages")
        for key in ("a", "b"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where(n)}: '{key}' must be a string (the response to judge)")
        refs = row.get("references", [])
        if not (isinstance(refs, list) and all(isinstance(r, str) and r.strip() for r in refs)):
            raise ValueError(f"{where(n)}: 'references' must be a list of non-empty strings (accepted answers)")


def annotate_file(cfg: RunConfig, in_path: str | Path, out_path: str | Path, log=print,
                  overwrite: bool = False) -> dict:
    """`oaif annotate`: judge the file's pairs, write them with their verdicts; the metrics."""
    rows = read_pairs(Path(in_path))  # bad input fails before any model loads
    outputs.check(out_path, KIND, folder=False, overwrite=overwrite)   # and a bad --out before any judging
    out, metrics = annotate_pairs(cfg, rows, log=log)
    outputs.write_jsonl(out_path, KIND, out, overwrite=overwrite)
    log(f"verdicts in {out_path}")
    return metrics


def annotate_pairs(cfg: RunConfig, rows: list[dict], *, annotator=None, log=print) -> tuple[list[dict], dict]:
    """Judge pairs ({"prompt", "a", "b"} rows, as `oaif annotate` reads them) in both orders
    with the config's annotator, or `annotator` (your function); returns the rows with their
    verdicts, and the judge's metrics (judge/canary_accuracy too when annotate.canary is on)."""
    check_pair_rows(rows, lambda n: f"pairs[{n - 1}]")
    if annotator is not None:
        cfg = with_python_annotator(cfg, annotator)
    check_inputs(cfg, python=annotator)
    canary = load_canary(cfg.annotate)   # a bad canary file fails before any model loads
    annotator = build_annotator(cfg, annotator)
    out, judgments = judge_rows(annotator, rows, cfg.annotate.min_label_mass)
    metrics = judgment_metrics(judgments) | {f"annotate/{k}": v for k, v in annotator.stats.items()}
    metrics["annotate/injection_attempts"] = injection_attempts(annotator, [row[k] for row in rows for k in "ab"])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    log(f"judged {len(rows)} pairs: order agreement {fmt(metrics['annotate/order_agreement'])}, "
        f"invalid rate {fmt(metrics['annotate/invalid_rate'])}, first-position rate "
        f"{fmt(metrics['annotate/first_position_rate'])}, label mass {fmt(metrics['annotate/label_mass'])}; verdicts "
        + ", ".join(f"{v}={sum(o['verdict'] == v for o in out)}" for v in ("a", "b", "tie", "invalid")))
    if metrics["annotate/injection_attempts"]:
        log(f"{metrics['annotate/injection_attempts']} response(s) hold judge markers, label patterns or chat "
            f"special tokens (the judge saw them neutralised)")
    if (right := accuracy(out)) is not None:   # a labelled check set
        metrics["annotate/accuracy"] = right
        log(f"agrees with the file's 'correct' field on {round(right * len(rows))}/{len(rows)} pairs (both orders "
            f"needed; ties and disagreements count as misses)")
    if canary is not None:
        metrics |= canary.check(annotator)
        log(f"canary pairs ({canary.path}): the judge agrees with {metrics['judge/canary_accuracy']:.0%} of their "
            f"labels (docs/guides/judges.md, \"Canary pairs\")")
    if warning := label_mass_warning(metrics):
        log(warning)
    return out, metrics


def judge_rows(annotator: Annotator, rows: list[dict], min_label_mass: float = 0.0) -> tuple[list[dict], list]:
    """The rows judged in both orders by `annotator`: (each row with its verdict, p_a and each
    order's answer; the judgments). min_label_mass: annotate.min_label_mass."""
    pairs = []
    for n, row in enumerate(rows):
        messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        a, b = (Sample(round=0, policy_version=0, prompt_id=str(n), messages=messages, index=k, text=text,
                       prompt_token_ids=[], token_ids=[], finish_reason="", references=row.get("references", []))
                for k, text in enumerate((row["a"], row["b"])))
        pairs.append((a, b))
    judged = judge_pairs(annotator, pairs, round=0, policy_version=0, min_label_mass=min_label_mass)
    out = []
    for row, j in zip(rows, judged.judgments):
        orders = {o.first: o for o in j.orders}
        out.append({**row, "verdict": VERDICT[j.verdict], "reason": j.verdict, "p_a": j.p_a,
                    "p_first_a_first": orders["a"].p_first if orders else None,
                    "raw_a_first": orders["a"].raw if orders else None,
                    "label_mass_a_first": orders["a"].label_mass if orders else None,
                    "p_first_b_first": orders["b"].p_first if orders else None,
                    "raw_b_first": orders["b"].raw if orders else None,
                    "label_mass_b_first": orders["b"].label_mass if orders else None,
                    "backend": j.backend, "model": j.model, "constitution": j.constitution,
                    "constitution_hash": j.constitution_hash, "template_hash": j.template_hash})
    return out, judged.judgments


def accuracy(out: list[dict]) -> float | None:
    """The share of judged rows whose verdict is their 'correct' response (a tie, a disagreement
    between the orders or an invalid answer is a miss); None unless every row is labelled."""
    if not out or not all(row.get("correct") in ("a", "b") for row in out):
        return None
    return sum(row["verdict"] == row["correct"] for row in out) / len(out)


class Canary:
    """annotate.canary: labelled pairs re-judged every `every` rounds by the run's annotator, its
    judgment cache bypassed (a cached answer would hide the change the check is for)."""

    def __init__(self, path: Path, rows: list[dict], every: int, min_label_mass: float):
        self.path, self.rows, self.every, self.min_label_mass = path, rows, every, min_label_mass
        self.first: list[str] | None = None   # the verdicts of the first check (of this process)

    def due(self, index: int) -> bool:
        return index % self.every == 0

    def check(self, annotator: Annotator) -> dict[str, float]:
        """judge/canary_accuracy: the share of the pairs whose verdict is their label, as
        annotate/accuracy; judge/canary_change: the share whose verdict (a, b, tie, disagree,
        invalid) differs from the first check's, which moves when the judge does even where
        accuracy does not (as many pairs turned right as wrong)."""
        out, _ = judge_rows(uncached(annotator), self.rows, self.min_label_mass)
        verdicts = [row["reason"] for row in out]
        if self.first is None:
            self.first = verdicts
        return {"judge/canary_accuracy": accuracy(out),
                "judge/canary_change": sum(v != f for v, f in zip(verdicts, self.first)) / len(verdicts)}


def canary_file(a: AnnotateConfig) -> Path | None:
    """The canary pairs of annotate.canary: the file it names, the bundled set of a constitution
    it names, or (empty) the bundled set of annotate.constitution's name; None when that
    constitution has no bundled set."""
    pairs = a.canary.pairs
    if pairs and not is_name(pairs):
        return data_path(pairs)
    bundled = DATA / "canaries" / f"{pairs or load_constitution(a.constitution).name}.jsonl"
    if pairs and not bundled.is_file():
        raise FileNotFoundError(f"annotate.canary.pairs: no bundled canary pairs named {pairs!r} (there are: "
                                f"{', '.join(sorted(p.stem for p in bundled.parent.glob('*.jsonl')))}); give a "
                                f"file of yours as a path")
    return bundled if bundled.is_file() else None


def load_canary(a: AnnotateConfig) -> Canary | None:
    """annotate.canary's pairs, read and checked (every row labelled); None when it is off."""
    path = canary_file(a) if a.canary.every else None
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"annotate.canary.pairs: {path} not found")
    rows = read_pairs(path)
    unlabelled = [n for n, row in enumerate(rows, 1) if row.get("correct") not in ("a", "b")]
    if unlabelled:
        raise ValueError(f"{path}:{unlabelled[0]}: a canary pair needs 'correct': \"a\" or \"b\" (the response "
                         f"the constitution prefers) (annotate.canary.pairs)")
    return Canary(path, rows, a.canary.every, a.min_label_mass)
