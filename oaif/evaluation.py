"""Is the trained policy better than the one it started from, by a judge, on prompts it did
not train on?

    oaif eval CONFIG [key=value ...] [--out FILE]     (and every eval.every rounds in oaif run)

One response per held-out prompt from each side (greedy unless eval.temperature > 0), every
pair judged in both orders by the evaluation annotator (`eval.annotate`; by default the
training one, with a warning), then:
  - win / tie / loss by the conservative rule: a win needs both orders to prefer the policy,
    a loss both to prefer the baseline; a disagreement between the orders, a judged tie or
    identical responses are ties; invalid answers are counted and left out;
  - win rate = (wins + ties / 2) / judged, with a bootstrap 95% interval;
  - a length-controlled win rate (after AlpacaEval LC): a logistic regression of the judge's
    preference on the standardized length difference, read at zero difference, so a judge
    that only rewards length gives about 50% however much shorter the policy got;
  - the KL of the policy to the reference along the policy's responses (train.response_kl;
    not in oaif run with a reference-free loss, which has no reference model to compare with);
  - the mean response length of each side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from oaif import outputs
from oaif.annotate.base import Annotator
from oaif.annotate.judge import judge_pairs, judgment_metrics
from oaif.annotate.backends import build_annotator, check_inputs, with_python_annotator
from oaif.checkpoint import export_merged, latest_checkpoint, read_trainer_state
from oaif.config import ConfigError, RunConfig
from oaif.datasets_io import load_prompts
from oaif.engine import local_engine
from oaif.faults import crash_point
from oaif.generate import encode_prompts, sample_seeds
from oaif.models import check_model, load_causal_lm, policy_tokenizer
from oaif.records import Prompt, Sample, read_jsonl, write_jsonl
from oaif.train import response_kl

OUT_KIND = "eval output"   # oaif eval --out (oaif/outputs.py)
OUTCOME = {"a": "win", "b": "loss", "tie": "tie", "disagree": "tie", "identical": "tie", "invalid": "invalid"}
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
TRAINING_JUDGE_WARNING = ("warning: eval.annotate is not set, so the policy is graded by the judge it was trained "
                          "to please; set eval.annotate (e.g. {backend: rules, constitution: constitutions/correct.yaml} "
                          "with eval.prompts=prompts/heldout_qa.jsonl) for an independent judge")


@dataclass(frozen=True)
class Response:
    prompt_id: str
    messages: list
    references: list[str]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


def eval_prompts(cfg: RunConfig) -> list[Prompt]:
    prompts = load_prompts(cfg.eval.prompts, "eval.prompts", cfg.eval.prompts_column, cfg.eval.prompts_split)
    return prompts[:cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts


def max_new_tokens(cfg: RunConfig) -> int:
    return cfg.eval.max_new_tokens or cfg.generate.max_new_tokens


def eval_annotator_config(cfg: RunConfig) -> RunConfig:
    """The config whose `annotate` is the evaluation annotator."""
    return cfg if cfg.eval.annotate is None else dataclasses.replace(cfg, annotate=cfg.eval.annotate)


def respond(engine, tokenizer, prompts: list[Prompt], cfg: RunConfig) -> list[Response]:
    """One response per prompt (greedy, or sampled at eval.temperature); prompts over
    policy.max_prompt_tokens are left out, the same ones for every model with this tokenizer."""
    kept, _ = encode_prompts(tokenizer, prompts, cfg.policy.max_prompt_tokens)
    # The same seeds for every model compared: a sampled answer differs by the model alone.
    seeds = sample_seeds(cfg.seed, "eval", len(kept), 1)
    outs = engine.sample([ids for _, ids in kept], seeds, cfg.eval.temperature, 1.0, max_new_tokens(cfg))
    return [Response(p.id, p.messages, list(p.references), ids, token_ids, text, finish)
            for (p, ids), [(token_ids, text, finish)] in zip(kept, outs)]


def lc_win_rate(p_policy: list[float], length_diff: list[float], l2: float = 1e-2, steps: int = 50) -> float | None:
    """Length-controlled win rate: fit P(policy better) ≈ σ(θ0 + θ1·d), d = the length
    difference (policy − baseline) divided by its standard deviation, by Newton's method on
    the soft labels (a little L2 on the slope keeps a perfectly separable case finite; the
    intercept is left free so it is not pulled toward 50%), and return σ(θ0),
    the predicted win rate at equal length (AlpacaEval LC, Dubois et al. 2024)."""
    n = len(p_policy)
    if n == 0:
        return None
    mean = sum(length_diff) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in length_diff) / n)
    x = [d / std if std > 0 else 0.0 for d in length_diff]
    t0 = t1 = 0.0
    for _ in range(steps):
        q = [1 / (1 + math.exp(-max(-60.0, min(60.0, t0 + t1 * xi)))) for xi in x]
        g0 = sum(qi - yi for qi, yi in zip(q, p_policy))
        g1 = sum((qi - yi) * xi for qi, yi, xi in zip(q, p_policy, x)) + l2 * t1
        w = [qi * (1 - qi) for qi in q]
        h00 = sum(w) + 1e-9   # a bare epsilon: every q at 0 or 1 would make it singular
        h01 = sum(wi * xi for wi, xi in zip(w, x))
        h11 = sum(wi * xi * xi for wi, xi in zip(w, x)) + l2
        det = h00 * h11 - h01 * h01
        t0 -= (h11 * g0 - h01 * g1) / det
        t1 -= (h00 * g1 - h01 * g0) / det
    return 1 / (1 + math.exp(-t0))


def bootstrap_interval(scores: list[float], resamples: int, seed: int = 0) -> tuple[float, float] | tuple[None, None]:
    """95% percentile interval of the mean score over resampled comparisons."""
    if not scores:
        return None, None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def summarize(records: list[dict], resamples: int, seed: int = 0) -> dict:
    """eval/* metrics from comparison records (see `compare`)."""
    valid = [r for r in records if r["outcome"] != "invalid"]
    scores = [SCORE[r["outcome"]] for r in valid]
    count = {name: sum(r["outcome"] == o for r in records)
             for o, name in (("win", "wins"), ("tie", "ties"), ("loss", "losses"), ("invalid", "invalid"))}
    lo, hi = bootstrap_interval(scores, resamples, seed)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731 (None, not 0, when nothing was judged)
    kls = [r["kl_to_ref"] for r in records if r["kl_to_ref"] is not None]
    return {
        "eval/win_rate_vs_ref": mean(scores), "eval/win_rate_ci_low": lo, "eval/win_rate_ci_high": hi,
        "eval/lc_win_rate_vs_ref": lc_win_rate([r["p_policy"] for r in valid],
                                               [r["policy_tokens"] - r["baseline_tokens"] for r in valid]),
        "eval/kl_to_ref": mean(kls),
        "eval/mean_length": mean([r["policy_tokens"] for r in records]),
        "eval/baseline_mean_length": mean([r["baseline_tokens"] for r in records]),
        **{f"eval/{k}": v for k, v in count.items()},
    }


def compare(annotator: Annotator, policy: list[Response], baseline: list[Response], kl: list[float] | None,
            round: int, policy_version: int, missing_eos_penalty: float = 0.0, min_label_mass: float = 0.0
            ) -> tuple[list[dict], dict]:
    """Judge policy (a) against baseline (b) on each prompt in both orders: (records, metrics)."""
    by_id = {r.prompt_id: r for r in baseline}
    pairs = []
    for side, responses in ((0, policy), (1, [by_id[r.prompt_id] for r in policy])):
        pairs.append([Sample(round=round, policy_version=policy_version, prompt_id=r.prompt_id, messages=r.messages,
                             index=side, text=r.text, prompt_token_ids=r.prompt_token_ids, token_ids=r.token_ids,
                             finish_reason=r.finish_reason, references=r.references) for r in responses])
    judged = judge_pairs(annotator, list(zip(*pairs)), round, policy_version, missing_eos_penalty,
                         min_label_mass=min_label_mass)
    records = []
    for k, (a, b, j) in enumerate(zip(*pairs, judged.judgments)):
        records.append({
            "round": round, "policy_version": policy_version, "prompt_id": a.prompt_id, "messages": a.messages,
            "policy": a.text, "baseline": b.text, "policy_tokens": len(a.token_ids), "baseline_tokens": len(b.token_ids),
            "outcome": OUTCOME[j.verdict], "verdict": j.verdict,
            "p_policy": 0.5 if j.verdict == "identical" else j.p_a,
            "orders": [dataclasses.asdict(o) for o in j.orders],   # first "a": the policy shown first
            "kl_to_ref": kl[k] if kl is not None else None,
            "backend": j.backend, "model": j.model, "constitution": j.constitution,
            "constitution_hash": j.constitution_hash})
    agreement = judgment_metrics(judged.judgments)
    metrics = {f"eval/{k.removeprefix('annotate/')}": agreement[k] for k in
               ("annotate/order_agreement", "annotate/first_position_rate", "annotate/label_mass")}
    return records, metrics


def format_summary(m: dict) -> str:
    f = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    return (f"win {m['eval/wins']} / tie {m['eval/ties']} / loss {m['eval/losses']} (invalid {m['eval/invalid']}): "
            f"win rate {f(m['eval/win_rate_vs_ref'])} [{f(m['eval/win_rate_ci_low'])}, "
            f"{f(m['eval/win_rate_ci_high'])}], LC win rate {f(m['eval/lc_win_rate_vs_ref'])}; mean length "
            f"{f(m['eval/mean_length'], '.1f')} vs {f(m['eval/baseline_mean_length'], '.1f')} tokens; "
            f"KL to ref {f(m['eval/kl_to_ref'], '.2f')}")


class Evaluator:
    """In-loop evaluation: the baseline's responses are made once; every evaluation samples
    the policy from the running engine (which holds the last sync) and judges both orders."""
    def __init__(self, cfg: RunConfig, run_dir: Path, annotator: Annotator, baseline: list[Response],
                 training: Annotator | None = None):
        """training: the judge the policy trains on, when it is not `annotator` and
        eval.train_judge is on: it grades the same pairs, so the two win rates can be set side
        by side (the hacking panel, alarms.judge_gap)."""
        self.cfg, self.run_dir, self.annotator, self.baseline = cfg, run_dir, annotator, baseline
        self.training = training
        self.prompts = [p for p in eval_prompts(cfg) if p.id in {r.prompt_id for r in baseline}]

    def due(self, round: int) -> bool:
        """Every eval.every rounds, and after the last."""
        every = self.cfg.eval.every
        return (every > 0 and (round + 1) % every == 0) or round == self.cfg.rounds - 1

    def __call__(self, engine, tokenizer, trainer, round: int, policy_version: int) -> dict:
        """The full evaluation: every held-out prompt, the KL to the start."""
        policy = respond(engine, tokenizer, self.prompts, self.cfg)
        kl = None if trainer.reference_free else \
            response_kl_of(trainer.policy, trainer.reference, policy, tokenizer.pad_token_id)
        judge = eval_annotator_config(self.cfg).annotate
        records, metrics = compare(self.annotator, policy, self.baseline, kl, round, policy_version,
                                   judge.missing_eos_penalty, judge.min_label_mass)
        metrics |= self.by_training_judge(records, policy, self.baseline, round, policy_version, "eval/train_judge")
        write_jsonl(self.run_dir / "eval" / f"round_{round:06d}.jsonl", records)
        crash_point("evaluate")
        return summarize(records, self.cfg.eval.bootstrap, self.cfg.seed) | metrics

    def live(self, engine, tokenizer, round: int, policy_version: int) -> dict:
        """eval.live_prompts: round `round`'s slice of the held-out prompts (the slices go round
        the set), its win rate against the start and the interval, which is wide: a trend
        between full evaluations, not a verdict."""
        n = min(self.cfg.eval.live_prompts, len(self.prompts))
        start = round * n % len(self.prompts)
        prompts = (self.prompts * 2)[start:start + n]
        ids = {p.id for p in prompts}
        policy = respond(engine, tokenizer, prompts, self.cfg)
        baseline = [r for r in self.baseline if r.prompt_id in ids]
        judge = eval_annotator_config(self.cfg).annotate
        records, _ = compare(self.annotator, policy, baseline, None, round, policy_version,
                             judge.missing_eos_penalty, judge.min_label_mass)
        training = self.by_training_judge(records, policy, baseline, round, policy_version,
                                          "eval/live_train_judge")
        write_jsonl(self.run_dir / "eval" / f"live_{round:06d}.jsonl", records)
        return {**self.win_rate(records, "eval/live"), "eval/live_prompts": len(records), **training}

    def by_training_judge(self, records: list[dict], policy: list[Response], baseline: list[Response], round: int,
                          policy_version: int, prefix: str) -> dict:
        """The training judge's verdicts on the pairs `records` hold (added to each record as
        train_judge_outcome) and its win rate, {prefix}_win_rate with its interval; nothing
        when there is no separate training judge."""
        if self.training is None:
            return {}
        theirs, _ = compare(self.training, policy, baseline, None, round, policy_version,
                            self.cfg.annotate.missing_eos_penalty, self.cfg.annotate.min_label_mass)
        for record, other in zip(records, theirs):
            record["train_judge_outcome"] = other["outcome"]
        return self.win_rate(theirs, prefix)

    def win_rate(self, records: list[dict], prefix: str) -> dict:
        """{prefix}_win_rate with its 95% interval, of comparison records: the slices and the
        second judge's grading report the win rate alone."""
        full = summarize(records, self.cfg.eval.bootstrap, self.cfg.seed)
        return {f"{prefix}_win_rate": full["eval/win_rate_vs_ref"],
                f"{prefix}_win_rate_ci_low": full["eval/win_rate_ci_low"],
                f"{prefix}_win_rate_ci_high": full["eval/win_rate_ci_high"]}


def response_kl_of(policy, reference, responses: list[Response], pad_id: int) -> list[float]:
    was_training = policy.training
    policy.eval()
    try:
        return response_kl(policy, reference, [r.prompt_token_ids for r in responses],
                           [r.token_ids for r in responses], pad_id)
    finally:
        policy.train(was_training)


def baseline_responses(cfg: RunConfig, run_dir: Path, engine, tokenizer, fresh: bool) -> list[Response]:
    """The baseline's responses for in-loop evaluation, saved in eval/baseline.jsonl with
    what answered (eval/baseline.json). A fresh run's engine holds the starting policy before
    round 0, so it answers for the default baseline; a resumed run reads the saved file
    unless the baseline or the prompts were changed since; another baseline gets its own engine."""
    path, source_path = run_dir / "eval" / "baseline.jsonl", run_dir / "eval" / "baseline.json"
    source = {"model": cfg.eval.baseline or cfg.policy.model, "prompts": cfg.eval.prompts,
              "max_new_tokens": max_new_tokens(cfg)}
    saved = json.loads(source_path.read_text()) if source_path.is_file() else None
    if path.is_file() and not fresh and saved in (None, source):   # None: saved before baseline.json was
        return [Response(**row) for row in read_jsonl(path)]
    if fresh and not cfg.eval.baseline:
        responses = respond(engine, tokenizer, eval_prompts(cfg), cfg)
    else:
        responses = generate_with(cfg.eval.baseline or cfg.policy.model, eval_prompts(cfg), cfg)
    write_jsonl(path, responses)
    source_path.write_text(json.dumps(source))
    return responses


def generate_with(model: str, prompts: list[Prompt], cfg: RunConfig) -> list[Response]:
    """Responses from `model` in a short-lived engine of its own (eager: compiling it would
    cost more than it saves)."""
    engine = local_engine(cfg, model, cfg.policy.max_prompt_tokens + max_new_tokens(cfg), enforce_eager=True)
    try:
        return respond(engine, policy_tokenizer(cfg.policy, model), prompts, cfg)
    finally:
        engine.close()


def resolve_policy(cfg: RunConfig, scratch: Path) -> tuple[str, Path | None]:
    """(model path for from_pretrained / vLLM, the checkpoint it came from or None). A
    checkpoint holding a LoRA adapter is merged into its base in `scratch`."""
    policy = cfg.eval.policy
    if not policy:
        run_dir = Path(cfg.output_dir) / cfg.name
        checkpoint = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"eval.policy is empty and {run_dir} has no checkpoints: set eval.policy=PATH "
                              f"(a checkpoint, an exported model or an HF path)")
    elif (Path(policy) / "trainer.pt").is_file():
        checkpoint = Path(policy)
    else:
        return policy, None
    if (checkpoint / "policy" / "adapter_config.json").is_file():
        return str(export_merged(checkpoint, scratch / "merged", cfg.policy.model, cfg.policy.dtype)), checkpoint
    return str(checkpoint / "policy"), checkpoint


def same_shape(a, b, tokenizer_a, tokenizer_b) -> bool:
    """Whether b's weights can be pushed into an engine built for a (and KL taken between them)."""
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return (a.config.architectures == b.config.architectures and shapes(a) == shapes(b)
            and tokenizer_a.get_vocab() == tokenizer_b.get_vocab())


def run_eval(cfg: RunConfig, out: str | Path | None = None, *, annotator=None, log=print,
             overwrite: bool = False) -> dict:
    """`oaif eval`: the policy against the baseline on the held-out prompts; writes every
    comparison to `out` (default: <run>/evals/round_XXXXXX.jsonl for a run's checkpoint) and
    a one-line summary beside it (.summary.jsonl); returns the metrics. annotator: your
    judge (a function or annotator object) in place of the config's eval judge. An explicit
    `out` and its summary are new files, or with overwrite earlier ones oaif wrote
    (oaif/outputs.py), checked before any model loads."""
    prompts = eval_prompts(cfg)           # bad input fails before any model loads
    judge_cfg = eval_annotator_config(cfg)
    if annotator is not None:
        judge_cfg = with_python_annotator(judge_cfg, annotator)
    check_inputs(judge_cfg, "eval.annotate" if cfg.eval.annotate else "annotate", python=annotator)
    if cfg.eval.annotate is None and annotator is None:
        log(TRAINING_JUDGE_WARNING)
    baseline_path = cfg.eval.baseline or cfg.policy.model
    check_model(baseline_path, "eval.baseline" if cfg.eval.baseline else "policy.model")
    explicit = out is not None
    if explicit:
        for path in (Path(out), Path(out).with_suffix(".summary.jsonl")):
            outputs.check(path, OUT_KIND, folder=False, overwrite=overwrite)

    def write(path: Path, rows: list) -> None:
        if explicit:
            outputs.write_jsonl(path, OUT_KIND, rows, overwrite=overwrite)
        else:
            write_jsonl(path, rows)

    with tempfile.TemporaryDirectory() as scratch:
        policy_path, checkpoint = resolve_policy(cfg, Path(scratch))
        if checkpoint is None:
            check_model(policy_path, "eval.policy")
        round = read_trainer_state(checkpoint)["round"] if checkpoint else -1
        if out is None and checkpoint is None:
            raise ConfigError(f"eval.policy={policy_path} is not a checkpoint of a run: pass --out FILE")
        # Apart from eval/, which the loop writes and a resume rewinds: a later `oaif resume`
        # never trips over it, and it never replaces the in-loop evaluation of that round.
        out = Path(out) if out is not None else checkpoint.parent.parent / "evals" / f"round_{round:06d}.jsonl"
        log(f"evaluating {policy_path} against {baseline_path} on {len(prompts)} prompts from {cfg.eval.prompts}")
        policy_model = load_causal_lm(policy_path, cfg.policy.dtype, trainable=False)
        reference = load_causal_lm(baseline_path, cfg.policy.dtype, trainable=False)
        tokenizer, policy_tok = policy_tokenizer(cfg.policy, baseline_path), policy_tokenizer(cfg.policy, policy_path)
        same = same_shape(reference, policy_model, tokenizer, policy_tok)
        # One engine serves both sides when it can: the baseline answers, then the policy's
        # weights are pushed in place (no second engine start).
        engine = local_engine(cfg, baseline_path, cfg.policy.max_prompt_tokens + max_new_tokens(cfg))
        try:
            baseline = respond(engine, tokenizer, prompts, cfg)
            if same:
                engine.load_weights(policy_model, 1)
                policy = respond(engine, policy_tok, prompts, cfg)
        finally:
            engine.close()
        if not same:
            policy = generate_with(policy_path, prompts, cfg)
            log("note: policy and baseline differ in architecture or vocabulary: eval/kl_to_ref is not computed")
        answered = {b.prompt_id for b in baseline}
        policy = [r for r in policy if r.prompt_id in answered]
        kl = response_kl_of(policy_model, reference, policy, policy_tok.pad_token_id) if same else None
        records, metrics = compare(build_annotator(judge_cfg, annotator), policy, baseline, kl, round, -1,
                                   judge_cfg.annotate.missing_eos_penalty, judge_cfg.annotate.min_label_mass)
    metrics = summarize(records, cfg.eval.bootstrap, cfg.seed) | metrics
    write(out, records)
    write(out.with_suffix(".summary.jsonl"), [{
        "policy": str(checkpoint or policy_path), "baseline": baseline_path, "prompts": cfg.eval.prompts,
        "judge": f"{records[0]['backend']}/{records[0]['constitution']}" if records else None, **metrics}])
    log(f"eval: {format_summary(metrics)}; comparisons in {out}")
    return metrics
