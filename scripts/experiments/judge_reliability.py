"""Judge reliability: for every judge this machine can run, how often it keeps its answer when
the two responses swap places, how often it simply prefers whichever comes first, how often its
answer cannot be read, and how many pairs the both-orders filter therefore drops (issue 16;
RLAIF §2.1.1: the largest labeler still preferred the same position in 18% of swapped pairs,
the smallest in 56%).

    taskset -c 0 .venv/bin/python scripts/experiments/judge_reliability.py [--out DIR] [--quick] [key=value ...]

1. Pairs: the policy (policy.model) samples two responses to each held-out question
   (eval.prompts, the first eval.max_prompts) with the loop's own Generator, seeded as round 0
   of a run. A pair where exactly one response contains an accepted answer (the
   `matches_reference` rule) is labelled with it. Saved as OUT/pairs.jsonl, in the input format
   of `oaif annotate`. The 24 clear-cut labelled pairs of prompts/judge_check_pairs.jsonl are
   judged beside them.
2. Judges, each through oaif.annotate_pairs (both orders, the tool's own aggregation): the
   `rules` control (constitutions/correct.yaml); the judge model (annotate.model, else the
   policy's) through the `vllm` backend and, without chain of thought, the `transformers`
   backend (the same prompt and read-out in another engine); a smaller judge
   (--small-judge) through `vllm`; and the judge model served by a local vLLM OpenAI-compatible
   server through the `openai` backend in text mode (the judge writes an answer, the label is
   read from its last line: a real invalid rate; chain of thought changes nothing there).
   Conditions for the LLM judges: plain (annotate.constitution with its examples removed),
   chain of thought, few-shot (the constitution as it is), both.
3. Per judge and condition: order agreement, first-position rate, invalid rate, label mass,
   the pairs kept and dropped, accuracy on the labelled pairs, seconds; on the labelled pairs,
   the sign accuracy and mean margin of the order-averaged probability (`p_a`, what OAIF and
   RLAIF train on, which a position bias equal in both orders does not move); and the same
   answers through the label-mass floor (annotate.min_label_mass: the judges run without it,
   the floor is applied to their recorded answers by the tool's own functions). Every rate and
   mean with a 95% interval, "n/a (k pairs)" below MIN_PAIRS. OUT/results.md holds the tables,
   a few raw answers and the plot; OUT/judged/*.jsonl every verdict with both orders' raw
   outputs; OUT/metrics.json the numbers.

--quick: the tiny model as policy and judge, 6 held-out pairs and 6 check pairs, no served
judge (the test's setting). Run from the checkout's root (the config's paths are relative).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Results, check_model, fmt_ci, table, wilson  # noqa: E402

import oaif  # noqa: E402
from oaif.annotate.base import Answer  # noqa: E402
from oaif.annotate.files import VERDICT  # noqa: E402
from oaif.annotate.judge import BELOW_LABEL_MASS, aggregate, floored, lean  # noqa: E402
from oaif.config import ConfigError  # noqa: E402
from oaif.console import LibraryLogs  # noqa: E402
from oaif.evaluation import bootstrap_interval  # noqa: E402
from oaif.records import read_jsonl, write_jsonl  # noqa: E402

CONFIG = "configs/experiments/judge_reliability.yaml"
CHECK_PAIRS = "prompts/judge_check_pairs.jsonl"
RULES_CONSTITUTION = "constitutions/correct.yaml"   # the control: exact, so order cannot matter
QUICK = ["policy.model=models/tiny", "eval.max_prompts=6", "policy.max_prompt_tokens=128"]
# RLAIF §2.1.1: the share of swapped pairs in which a labeler preferred the same position,
# i.e. 1 - order agreement, for its largest and smallest labeler.
RLAIF_SAME_POSITION = {"largest": 0.18, "smallest": 0.56}
CONDITIONS = ("plain", "CoT", "few-shot", "CoT + few-shot")
# A rate over fewer valid pairs than this is shown as 'n/a (k pairs)': one pair's 0 or 1 is not a rate.
MIN_PAIRS = 5
RESAMPLES = 2000   # bootstrap resamples of each mean's interval


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for `oaif run`")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="runs/experiments/judge_reliability")
    p.add_argument("--small-judge", default="models/tiny",
                   help="a second, smaller judge model, through vllm ('' to leave it out)")
    p.add_argument("--no-served", action="store_true",
                   help="leave out the judge served by a local vLLM server (openai backend)")
    p.add_argument("--quick", action="store_true", help="tiny model as policy and judge, a handful of pairs")
    return p.parse_args()


# 1. Pairs.

def sample_pairs(cfg) -> list[dict]:
    """Two samples per held-out prompt from the policy, as `oaif annotate` input rows."""
    from oaif.constitution import matches_reference
    from oaif.engine import local_engine
    from oaif.evaluation import eval_prompts
    from oaif.generate import Generator
    from oaif.models import load_tokenizer

    g = cfg.generate
    if g.samples_per_prompt != 2:
        raise SystemExit(f"error: generate.samples_per_prompt is {g.samples_per_prompt}; the pairs need 2")
    prompts = eval_prompts(cfg)
    engine = local_engine(cfg)
    try:
        generator = Generator(engine, load_tokenizer(cfg.policy.model), g, cfg.policy.max_prompt_tokens, cfg.seed)
        groups, _ = generator.sample(prompts, round=0, policy_version=0)
    finally:
        engine.close()
    rows = []
    for a, b in groups:
        row = {"id": a.prompt_id, "prompt": a.messages, "a": a.text, "b": b.text, "references": list(a.references),
               "finish": [a.finish_reason, b.finish_reason]}
        right = [matches_reference(s.text, tuple(a.references)) for s in (a, b)]
        if right[0] != right[1]:   # exactly one gives an accepted answer: a labelled pair
            row["correct"] = "a" if right[0] else "b"
        rows.append(row)
    return rows


# 2. Judges.

@contextlib.contextmanager
def served(cfg, model: str):
    """A vLLM OpenAI-compatible server for `model` on a free local port; yields its /v1 URL."""
    from oaif.engine.vllm import resolve_eager
    from oaif.engine.server import start_server, stop_server

    a = cfg.annotate
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    # The server's engine binds its threads itself and by default keeps a core in reserve:
    # given the CPUs this process may use, none reserved, it stays where this run was pinned.
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpus, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = start_server(model, None, a.dtype, cfg.seed + 1, a.max_prompt_tokens + a.openai.max_tokens, a.kv_cache_gib,
                        ["--gpu-memory-utilization", str(a.gpu_memory_utilization),
                         *(["--enforce-eager"] if resolve_eager(a.enforce_eager) else [])], env=env)
    try:
        yield f"http://127.0.0.1:{proc.port}/v1"
    finally:
        stop_server(proc)


def judges(cfg, small_judge: str, served_judge: bool) -> list[dict]:
    """Each judge: a name, its overrides, the conditions it is run under, and whether it needs
    the served model (its base_url is known only once the server is up)."""
    model = cfg.annotate.model or cfg.policy.model
    name = Path(model).name
    out = [{"name": "rules (correct.yaml)", "overrides": ["annotate.backend=rules",
                                                           f"annotate.constitution={RULES_CONSTITUTION}"],
            "conditions": ["n/a"]},
           {"name": f"{name} vllm", "overrides": ["annotate.backend=vllm", f"annotate.model={model}"],
            "conditions": CONDITIONS},
           # The same prompt and read-out as vllm in another engine: it shows the numbers are the
           # model's, not the engine's. Its chain of thought would be the vllm judge's greedy text
           # again through a slower generate (the costliest rows here), so it is left out.
           {"name": f"{name} transformers", "overrides": ["annotate.backend=transformers", f"annotate.model={model}"],
            "conditions": ("plain", "few-shot")}]
    if small_judge:
        out.append({"name": f"{Path(small_judge).name} vllm",
                    "overrides": ["annotate.backend=vllm", f"annotate.model={small_judge}"], "conditions": CONDITIONS})
    if served_judge:
        # Text mode: the written answer is its own rationale, so chain of thought changes nothing there.
        out.append({"name": f"{name} openai (served, text)", "overrides": ["annotate.backend=openai",
                                                                           f"annotate.model={model}"],
                    "conditions": ("plain", "few-shot"), "served": model})
    return out


def condition_overrides(condition: str, plain: Path, few_shot: str) -> list[str]:
    if condition == "n/a":
        return []
    return [f"annotate.constitution={few_shot if 'few-shot' in condition else plain}",
            f"annotate.chain_of_thought={'true' if 'CoT' in condition else 'false'}"]


def without_examples(constitution: str, out: Path) -> Path:
    """The constitution with its few-shot examples removed: the plain conditions' judge prompt."""
    import yaml

    from oaif.constitution import ConstitutionError, load_constitution

    try:
        examples = load_constitution(constitution).examples
    except ConstitutionError as e:
        raise SystemExit(f"error: {e}") from None
    if not examples:
        raise SystemExit(f"error: {constitution} has no examples, so the few-shot conditions would equal the plain "
                         f"ones; set annotate.constitution to one with examples (constitutions/helpful.yaml)")
    raw = yaml.safe_load(Path(constitution).read_text())
    path = out / f"{Path(constitution).stem}_no_examples.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "examples"}, sort_keys=False))
    return path


# 3. Metrics.

def proportion(k: float, n: int) -> dict:
    """k of n, with its 95% Wilson interval."""
    low, high = wilson(k, n)
    return {"value": k / n if n else None, "low": low, "high": high, "n": n}


def mean_ci(scores: list[float]) -> dict:
    """The mean, with its 95% bootstrap interval (resampling the pairs)."""
    low, high = bootstrap_interval(scores, RESAMPLES)
    return {"value": statistics.fmean(scores) if scores else None, "low": low, "high": high, "n": len(scores)}


def measure(rows: list[dict]) -> dict:
    """The judged rows' metrics, by the definitions of oaif.annotate.judge.judgment_metrics (the
    tool computes them over all rows; here they are needed per set), each rate with its interval
    and the number of pairs behind it."""
    reasons = Counter(r["reason"] for r in rows)
    judged = [r for r in rows if r["reason"] != "identical"]
    valid = [r for r in judged if r["reason"] != "invalid"]
    # Per pair, not per answer: the two orders of a pair are not independent, so the pair is the
    # unit of every interval (the first-position rate's share of a pair's two answers, the mean
    # label mass of its two orders).
    first = [sum(r[f"p_first_{o}_first"] > 0.5 for o in "ab") / 2 for r in valid]
    answer_masses = [[r[f"label_mass_{o}_first"] for o in "ab" if r[f"label_mass_{o}_first"] is not None]
                     for r in judged]
    masses = [statistics.fmean(m) for m in answer_masses if m]
    every_mass = [m for pair in answer_masses for m in pair]
    labelled = [r for r in rows if r.get("correct") in ("a", "b")]
    right = sum(r["verdict"] == r["correct"] for r in labelled)
    # The order-averaged P(correct response better): p_a is the mean of P(a better) over the two
    # orders, the probability OAIF and RLAIF train on. Its sign is read as the tool reads an
    # order's answer (oaif.annotate.judge.lean); an exact 0.5 is a tie, counted as half right.
    p_correct = [r["p_a"] if r["correct"] == "a" else 1 - r["p_a"] for r in labelled if r["p_a"] is not None]
    sign = Counter(lean(p) for p in p_correct)
    return {
        "pairs": len(rows), "kept": reasons["a"] + reasons["b"], "disagree": reasons["disagree"],
        "tie": reasons["tie"], "invalid": reasons["invalid"], "identical": reasons["identical"],
        "order_agreement": proportion(len(valid) - reasons["disagree"], len(valid)),
        "first_position_rate": proportion(sum(first), len(first)),
        "invalid_rate": proportion(reasons["invalid"], len(judged)),
        "label_mass": mean_ci(masses),
        "label_mass_range": [min(every_mass), max(every_mass)] if every_mass else None,
        # What the both-orders filter removes: the orders disagree, or an order has no readable answer.
        "dropped_by_filter": proportion(reasons["disagree"] + reasons["invalid"], len(judged)),
        # Pairs made invalid by annotate.min_label_mass, as annotate/below_label_mass counts them.
        "below_floor": proportion(sum(any(str(r[f"raw_{o}_first"]).startswith(BELOW_LABEL_MASS) for o in "ab")
                                      for r in judged), len(judged)),
        "labelled": len(labelled), "right": right, "right_rate": proportion(right, len(labelled)),
        "sign": {"right": sign[1], "tie": sign[0], "wrong": sign[-1]},
        "sign_accuracy": proportion(sign[1] + sign[0] / 2, len(p_correct)),
        "margin": mean_ci([p - 0.5 for p in p_correct]),
    }


def with_floor(rows: list[dict], floor: float) -> list[dict]:
    """The judged rows as annotate.min_label_mass = floor would have judged them: each order's
    recorded answer through the tool's own floor (floored) and aggregation (aggregate). The
    judges run without it, so that both are measured from one set of answers."""
    out = []
    for r in rows:
        if r["reason"] == "identical":
            out.append(r)
            continue
        first, second = (floored(Answer(r[f"p_first_{o}_first"], r[f"raw_{o}_first"], r[f"label_mass_{o}_first"]),
                                 floor) for o in "ab")
        reason, p_a = aggregate(first.p_first, second.p_first)
        out.append({**r, "reason": reason, "verdict": VERDICT[reason], "p_a": p_a,
                    "p_first_a_first": first.p_first, "raw_a_first": first.raw,
                    "p_first_b_first": second.p_first, "raw_b_first": second.raw})
    return out


def judge_all(cfg_path: str, base: list[str], rows: list[dict], judge: dict, condition: str, plain: Path,
              few_shot: str, extra: list[str]) -> tuple[list[dict], dict, float, float]:
    """One judge under one condition, through oaif.annotate_pairs; (judged rows, the tool's
    metrics over all rows, wall seconds and this process's CPU seconds, the judge's load included)."""
    # Without the label-mass floor: the answers are recorded whole, and with_floor applies it.
    cfg = oaif.load_config(cfg_path, base + judge["overrides"] + extra + condition_overrides(condition, plain, few_shot)
                           + ["annotate.min_label_mass=0"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    judged, metrics = oaif.annotate_pairs(cfg, rows, log=lambda line: print(f"  {line}", flush=True))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # The judge's engine is unreferenced now; end it before the next one starts (vLLM tears down
    # process-wide state when an engine is collected, which must not happen under a later engine).
    gc.collect()
    return judged, metrics, seconds, cpu


def short(text: str | None, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def short_raw(raw: str | None) -> str:
    """A judge's raw output, its rationale shortened but its label read-out (after ' next=') whole."""
    head, sep, tail = str(raw).rpartition(" next=")
    return f"{short(head, 160)}{sep}{tail}" if sep else short(raw)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main() -> None:
    args = parse_args()
    base = (QUICK if args.quick else []) + args.overrides
    try:
        cfg = oaif.load_config(args.config, base)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    floor = cfg.annotate.min_label_mass
    if not floor:
        raise SystemExit("error: annotate.min_label_mass is 0; set the label-mass floor whose effect the "
                         "experiment reports (the judges themselves run without it)")
    small_judge = "" if args.quick else args.small_judge
    served_judge = not (args.quick or args.no_served)
    check_model(cfg.policy.model, "policy.model")
    if cfg.annotate.model:
        check_model(cfg.annotate.model, "annotate.model")
    if small_judge:
        check_model(small_judge, "--small-judge")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)   # before any engine: vLLM's in-process CPU worker keeps it

    res = Results(Path(args.out), "Judge reliability: position bias, invalid answers and the both-orders filter")
    logs = LibraryLogs(verbose=False)   # vLLM's and transformers' records go to OUT/libraries.log, as to run.log
    logs.handler.open(res.out / "libraries.log")
    plain = without_examples(cfg.annotate.constitution, res.out)
    check = read_jsonl(Path(CHECK_PAIRS))[:6 if args.quick else None]

    t0 = time.perf_counter()
    heldout = sample_pairs(cfg)
    sample_seconds = time.perf_counter() - t0
    write_jsonl(res.out / "pairs.jsonl", heldout)
    print(f"sampled {len(heldout)} held-out pairs in {sample_seconds:.0f} s -> {res.out / 'pairs.jsonl'}", flush=True)
    rows = [{**r, "set": "heldout"} for r in heldout] + [{**r, "set": "check"} for r in check]

    results = []
    for judge in judges(cfg, small_judge, served_judge):
        t0 = time.perf_counter()
        with served(cfg, judge["served"]) if "served" in judge else contextlib.nullcontext() as url:
            # The server starts once for the judge's rows; its work is not in this process's CPU time.
            server_seconds = time.perf_counter() - t0 if url else None
            extra = [f"annotate.openai.base_url={url}"] if url else []
            for condition in judge["conditions"]:
                print(f"{judge['name']}, {condition}:", flush=True)
                judged, tool, seconds, cpu = judge_all(args.config, base, rows, judge, condition, plain,
                                                       cfg.annotate.constitution, extra)
                print(f"  {seconds:.0f} s", flush=True)
                name = slug(f"{judge['name']} {condition}")
                write_jsonl(res.out / "judged" / f"{name}.jsonl", judged)
                results.append({"judge": judge["name"], "condition": condition, "seconds": seconds,
                                "cpu_seconds": None if url else cpu, "server_start_seconds": server_seconds,
                                "tool": tool,
                                "all": measure(judged),
                                **{s: measure([r for r in judged if r["set"] == s]) for s in ("heldout", "check")},
                                **{f"{s}_floor": measure(with_floor([r for r in judged if r["set"] == s], floor))
                                   for s in ("heldout", "check")},
                                "judged_file": f"judged/{name}.jsonl"})
    logs.close()
    (res.out / "metrics.json").write_text(json.dumps(results, indent=1))
    report(res, cfg, heldout, check, results, sample_seconds, plain)
    print(f"wrote {res.write()}")


# The report.

def cell(d: dict, spec: str = ".2f") -> str:
    """A rate or mean with its interval, or 'n/a (k pairs)' below MIN_PAIRS."""
    return fmt_ci(d["value"], d["low"], d["high"], d["n"], MIN_PAIRS, spec=spec)


def bar(d: dict) -> tuple | str:
    """A bar_plot value: (value, low, high), or the table's 'n/a (k pairs)' below MIN_PAIRS."""
    return (d["value"], d["low"], d["high"]) if d["n"] >= MIN_PAIRS and d["value"] is not None else cell(d)


def flipped(d: dict) -> dict:
    """1 - the rate, its interval flipped: the same position when swapped, from order agreement."""
    if d["value"] is None:
        return d
    return {"value": 1 - d["value"], "low": 1 - d["high"], "high": 1 - d["low"], "n": d["n"]}


def order_averaged(results: list[dict], labelled: int, check_labelled: int) -> str:
    """The section on what OAIF and RLAIF train on: the order-averaged P(correct) on the labelled pairs."""
    sets = (("heldout", "held-out"), ("check", "check"), ("all", "both sets"))
    header = ["judge", "condition"] + [f"{name}: {col}" for _, name in sets
                                       for col in ("right / tie / wrong", "sign accuracy", "mean margin")]
    rows = [[r["judge"], r["condition"]] + [c for key, _ in sets for c in (
        "{right} / {tie} / {wrong}".format(**r[key]["sign"]), cell(r[key]["sign_accuracy"]),
        cell(r[key]["margin"], "+.3f"))] for r in results]
    return f"""### The order-averaged probability on the labelled pairs

OAIF and RLAIF do not filter on the two orders: they average them. The tool records that average
per judgment as `p_a`, the mean over both orders of the judge's P(a better), and a kept pair trains
on it; a judge that prefers the first position by the same amount in both orders cancels out of
it, so it may still carry signal where the verdicts carry none. On a labelled pair (the
{labelled} held-out ones, the {check_labelled} check pairs) P(correct) is `p_a`, or 1 - `p_a` when b is the correct
response. Sign accuracy: the share of the pairs with a valid `p_a` on which P(correct) > 0.5, an
exact 0.5 (a tie) counted as half; 0.5 is no signal. Mean margin: the mean of P(correct) - 0.5; 0
is no signal, +0.5 always right and sure of it.

""" + table(header, rows)


def with_the_floor(results: list[dict], floor: float) -> str:
    """The section on the label-mass floor: the same answers as annotate.min_label_mass = floor reads them."""
    header = ["judge", "condition", "label mass: lowest – highest answer", "held-out pairs below the floor",
              "held-out kept: without → with the floor", "held-out invalid rate with the floor",
              "held-out right: without → with", "check pairs below the floor", "check right: without → with"]
    span = lambda m: "-" if m is None else f"{m[0]:.3f} – {m[1]:.3f}"  # noqa: E731
    rows = [[r["judge"], r["condition"], span(r["all"]["label_mass_range"]),
             cell(r["heldout_floor"]["below_floor"]), f"{r['heldout']['kept']} → {r['heldout_floor']['kept']}",
             cell(r["heldout_floor"]["invalid_rate"]), f"{r['heldout']['right']} → {r['heldout_floor']['right']}",
             cell(r["check_floor"]["below_floor"]), f"{r['check']['right']} → {r['check_floor']['right']}"]
            for r in results]
    return f"""### With the label-mass floor (`annotate.min_label_mass` = {floor:g})

The same answers, each order's through the tool's floor: an answer with less than {floor:g} of the
judge's next-token probability on the two labels is invalid, and a pair with such an answer is
dropped (`annotate/below_label_mass` counts these pairs; judges without a label mass, the rules and
the text-mode judge, are never below it). "Below the floor" is that share of the judged pairs.

""" + table(header, rows)


def report(res: Results, cfg, heldout: list[dict], check: list[dict], results: list[dict], sample_seconds: float,
           plain: Path) -> None:
    from oaif.constitution import load_constitution, matches_reference

    floor = cfg.annotate.min_label_mass
    both = Counter(tuple(matches_reference(r[k], tuple(r["references"])) for k in "ab") for r in heldout)
    labelled = sum(1 for r in heldout if "correct" in r)
    res.add(f"""Held-out pairs: {len(heldout)} questions of `{cfg.eval.prompts}`, two responses each from
`{cfg.policy.model}` (temperature {cfg.generate.temperature}, at most {cfg.generate.max_new_tokens} tokens;
sampled in {sample_seconds:.0f} s; `pairs.jsonl`). By the `matches_reference` rule: {labelled} pairs have
exactly one correct response (the labelled subset), {both[(True, True)]} both correct, {both[(False, False)]}
neither; {sum(r['a'] == r['b'] for r in heldout)} pairs are identical (not judged). Beside them, the
{len(check)} clear-cut labelled pairs of `{CHECK_PAIRS}`. Judge prompt: `{cfg.annotate.template}` with
`{cfg.annotate.constitution}` (few-shot: its {len(load_constitution(cfg.annotate.constitution).examples)}
example(s)) or `{plain.name}` (plain: the same without examples); chain of thought: a greedy rationale of at most
{cfg.annotate.rationale_tokens} tokens, then the label (RLAIF §2.1.2). Every judgment asked afresh (no cache) and
without the label-mass floor; the last table applies `annotate.min_label_mass` = {floor:g} to the same answers.
Seconds include loading the judge, and the served judge's server start is given beside them. Load average
at the end of the run (1 / 5 / 15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores, this
run pinned to {len(os.sched_getaffinity(0))} of them: other work on the machine stretches the wall seconds, not
this process's CPU seconds.

Intervals: 95%. A rate's is Wilson's, over the pairs behind it (the first-position rate counts each
pair's two answers as one observation, the share of them that prefer the first position: the two
orders of a pair are not independent, so counting pairs, not answers, is the cautious choice); a
mean's (label mass, margin) is a bootstrap over the pairs ({RESAMPLES} resamples). A rate or mean over
fewer than {MIN_PAIRS} pairs is shown as "n/a (k pairs)".""")

    header = ["judge", "condition", "order agreement", "same position when swapped", "first-position rate",
              "invalid rate", "label mass", "kept / disagree / tie / invalid / identical", "dropped by the filter",
              "right on labelled pairs", "seconds (CPU s)"]
    rows = []
    for r in results:
        m = r["heldout"]
        if r["server_start_seconds"] is None:
            seconds = f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})"
        else:   # the judging ran in the server's process
            seconds = f"{r['seconds']:.0f} (in the server; its start: {r['server_start_seconds']:.0f})"
        rows.append([r["judge"], r["condition"], cell(m["order_agreement"]), cell(flipped(m["order_agreement"])),
                     cell(m["first_position_rate"]), cell(m["invalid_rate"]), cell(m["label_mass"]),
                     f"{m['kept']} / {m['disagree']} / {m['tie']} / {m['invalid']} / {m['identical']}",
                     cell(m["dropped_by_filter"]), f"{m['right']} / {m['labelled']}: {cell(m['right_rate'])}",
                     seconds])
    res.add(f"### The {len(heldout)} held-out pairs\n\n" + table(header, rows) + f"""

"Same position when swapped" is 1 - order agreement: the share of judged pairs in which the judge
preferred the same *position* in both orders, RLAIF's measure (§2.1.1: {RLAIF_SAME_POSITION['largest']:.0%} for
its largest labeler, {RLAIF_SAME_POSITION['smallest']:.0%} for its smallest). The first-position rate is the
share of valid answers (each order of each judged pair) that prefer the response shown first: 0.5
for a judge without position bias that never answers a tie; the rules' exact ties (both responses
correct, or neither) prefer neither, so theirs is lower. A pair is kept (becomes a DPO pair) when
both orders prefer the same response; the both-orders filter drops it when they disagree or one
has no readable answer ("dropped by the filter", a share of the judged pairs; ties and identical
responses are dropped too, counted apart). "Right on labelled pairs" counts kept verdicts for the
correct response, out of the pairs with exactly one correct response. Seconds are wall time, CPU
seconds this process's.""")

    res.add(order_averaged(results, labelled, sum(1 for r in check if "correct" in r)))
    header = ["judge", "condition", "order agreement", "first-position rate", "label mass", "right in both orders"]
    rows = [[r["judge"], r["condition"], cell(r["check"]["order_agreement"]), cell(r["check"]["first_position_rate"]),
             cell(r["check"]["label_mass"]), f"{r['check']['right']} / {r['check']['labelled']}: "
                                             f"{cell(r['check']['right_rate'])}"] for r in results]
    res.add(f"### The {len(check)} clear-cut check pairs (`{CHECK_PAIRS}`)\n\n" + table(header, rows))

    res.add(with_the_floor(results, floor))

    groups = list(dict.fromkeys(r["judge"] for r in results))
    conditions = list(dict.fromkeys(r["condition"] for r in results))
    # Bars only where a judge ran under a condition (the rules under none, transformers without CoT).
    series = lambda key: {c: {r["judge"]: bar(r["heldout"][key]) for r in results if r["condition"] == c}  # noqa: E731
                          for c in conditions}
    agreement_refs = {f"RLAIF {k} labeler": 1 - v for k, v in RLAIF_SAME_POSITION.items()}
    res.bars("judge_reliability.png", f"Judges on {len(heldout)} held-out pairs, both orders (bars: 95% intervals)",
             groups, [
                 ("order agreement", series("order_agreement"), agreement_refs),
                 ("first-position rate", series("first_position_rate"), {"no position bias": 0.5}),
                 ("invalid rate", series("invalid_rate")),
                 ("label mass", series("label_mass"), {"annotate.min_label_mass": floor}),
                 (f"sign accuracy of the order-\naveraged P, {labelled} labelled", series("sign_accuracy"),
                  {"no signal": 0.5}),
             ])

    # What the judges wrote, not only what they scored: one labelled pair, both orders.
    sample = next((r for r in heldout if "correct" in r), heldout[0] if heldout else None)
    if sample is None:
        return
    lines = [f"### Raw answers on one held-out pair\n\nQuestion: {short(sample['prompt'][-1]['content'])}  \n"
             f"a: {short(sample['a'])}  \nb: {short(sample['b'])}  \ncorrect: {sample.get('correct', '-')}\n"]
    for r in results:
        got = next(j for j in read_jsonl(res.out / r["judged_file"]) if j.get("id") == sample["id"])
        lines.append(f"- **{r['judge']}, {r['condition']}**: verdict `{got['reason']}`; a first: "
                     f"`{short_raw(got['raw_a_first'])}`; b first: `{short_raw(got['raw_b_first'])}`")
    res.add("\n".join(lines))


if __name__ == "__main__":
    main()
