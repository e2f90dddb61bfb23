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
"""

from __future__ import annotations

from pathlib import Path

from oaif import outputs
from oaif.annotate.judge import injection_attempts, judge_pairs, judgment_metrics, label_mass_warning
from oaif.annotate.backends import build_annotator, check_inputs, with_python_annotator
from oaif.config import RunConfig
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
    verdicts, and the judge's metrics."""
    check_pair_rows(rows, lambda n: f"pairs[{n - 1}]")
    if annotator is not None:
        cfg = with_python_annotator(cfg, annotator)
    check_inputs(cfg, python=annotator)
    annotator = build_annotator(cfg, annotator)
    pairs = []
    for n, row in enumerate(rows):
        messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        a, b = (Sample(round=0, policy_version=0, prompt_id=str(n), messages=messages, index=k, text=text,
                       prompt_token_ids=[], token_ids=[], finish_reason="", references=row.get("references", []))
                for k, text in enumerate((row["a"], row["b"])))
        pairs.append((a, b))
    judged = judge_pairs(annotator, pairs, round=0, policy_version=0)
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
    metrics = judgment_metrics(judged.judgments) | {f"annotate/{k}": v for k, v in annotator.stats.items()}
    metrics["annotate/injection_attempts"] = injection_attempts(annotator, [row[k] for row in rows for k in "ab"])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    log(f"judged {len(rows)} pairs: order agreement {fmt(metrics['annotate/order_agreement'])}, "
        f"invalid rate {fmt(metrics['annotate/invalid_rate'])}, first-position rate "
        f"{fmt(metrics['annotate/first_position_rate'])}, label mass {fmt(metrics['annotate/label_mass'])}; verdicts "
        + ", ".join(f"{v}={sum(o['verdict'] == v for o in out)}" for v in ("a", "b", "tie", "invalid")))
    if metrics["annotate/injection_attempts"]:
        log(f"{metrics['annotate/injection_attempts']} response(s) hold judge markers, label patterns or chat "
            f"special tokens (the judge saw them neutralised)")
    if all(row.get("correct") in ("a", "b") for row in rows):   # a labelled check set
        right = sum(o["verdict"] == row["correct"] for o, row in zip(out, rows))
        metrics["annotate/accuracy"] = right / len(rows)
        log(f"agrees with the file's 'correct' field on {right}/{len(rows)} pairs (both orders needed; "
            f"ties and disagreements count as misses)")
    if warning := label_mass_warning(metrics):
        log(warning)
    return out, metrics
