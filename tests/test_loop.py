"""Tier 3: the whole loop through the CLI, as a user runs it."""

import json
import os
import signal

from oaif.records import read_jsonl

from conftest import ROOT, oaif_main, run_oaif, versions_follow_training

METRICS = ["round", "pairs_kept", "generate/mean_length", "annotate/order_agreement", "annotate/invalid_rate",
           "round/seconds", "round/pairs_per_s"]
TRAINED = ["train/loss", "train/reward_accuracy", "sync/seconds"]   # only in a round that kept pairs


def test_rules_concise_run_makes_responses_shorter(concise_run, tiny_model):
    run_dir, r = concise_run
    assert f"run directory: {run_dir}" in r.stdout
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(8))
    for m in metrics:
        assert all(k in m for k in METRICS), sorted(m)
        assert all((k in m) == (m["pairs_kept"] > 0) for k in TRAINED), sorted(m)
    assert metrics[0]["pairs_kept"] > 0 and sum(m["pairs_kept"] for m in metrics) >= 40   # not vacuous below
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"mean length {first:.1f} -> {last:.1f}: the policy did not learn 'shorter'"
    # Records carry round and policy version; pairs of round k were sampled from version k.
    for k in range(8):
        pairs = read_jsonl(run_dir / f"rounds/{k:06d}/pairs.jsonl")
        assert len(pairs) == metrics[k]["pairs_kept"]
        assert all(p["round"] == k and p["policy_version"] == k and len(p["chosen"]) < len(p["rejected"])
                   for p in pairs)
    saved = (run_dir / "config.yaml").read_text()
    assert f"model: {tiny_model}" in saved and "rounds: 8" in saved
    # One table line per round is printed.
    assert sum(line.split()[:1] == [str(k)] for line in r.stdout.splitlines() for k in range(8)) == 8


def test_vllm_judge_run_records_both_orders(tiny_model, tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=judge", "rounds=2", "prompts_per_round=8", "annotate.backend=vllm",
                 "annotate.constitution=constitutions/helpful.yaml", f"annotate.cache={tmp_path}/cache.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(2):
        judgments = read_jsonl(tmp_path / f"judge/rounds/{k:06d}/judgments.jsonl")
        assert len(judgments) == 8 and any(j["verdict"] != "identical" for j in judgments)
        for j in judgments:
            assert j["backend"] == "vllm" and j["model"] == str(tiny_model) and j["constitution"] == "helpful"
            if j["verdict"] == "identical":
                continue
            assert [o["first"] for o in j["orders"]] == ["a", "b"]
            for o in j["orders"]:
                assert 0.0 < o["p_first"] < 1.0 and "logp[1]=" in o["raw"] and "logp[2]=" in o["raw"]
    metrics = read_jsonl(tmp_path / "judge/metrics.jsonl")
    assert len(metrics) == 2 and metrics[0]["annotate/requests"] > 0 and metrics[0]["annotate/prompt_tokens"] > 0
    strict_json_lines(tmp_path / "judge/metrics.jsonl")
    # The tiny model is no judge: the low-label-mass warning is printed after the first round
    # exactly when its label mass is under one half, and once.
    mass = metrics[0]["annotate/label_mass"]
    assert r.stdout.count("warning: the judge put only") == (mass < 0.5), (mass, r.stdout[-2000:])
    if mass < 0.5:
        assert f"warning: the judge put only {mass:.0%} of its next-token probability" in r.stdout


def strict_json_lines(path):
    """Every line parses as strict JSON (no NaN or Infinity, which most readers reject)."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_non_finite_metric_is_written_as_strict_json(tmp_path):
    from oaif.records import append_jsonl

    append_jsonl(tmp_path / "m.jsonl", {"train/loss": float("nan"), "ratio": [float("inf"), 1.5], "round": 0})
    assert strict_json_lines(tmp_path / "m.jsonl") == [{"train/loss": None, "ratio": [None, 1.5], "round": 0}]


def test_mixed_annotator_run_with_sampled_principles_and_chain_of_thought(tiny_model, tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(f"""
policy: {{model: {tiny_model}}}
output_dir: {tmp_path}
name: mix
rounds: 2
prompts_per_round: 6
annotate:
  backend: mix
  principles: sample
  chain_of_thought: true
  rationale_tokens: 8
  cache: {tmp_path}/cache.jsonl
  mix:
    - {{backend: transformers, constitution: constitutions/harmless.yaml, weight: 1.0}}
    - {{backend: rules, constitution: constitutions/concise.yaml, weight: 3.0}}
train: {{learning_rate: 1.0e-4}}
""")
    r = oaif_main("run", str(config))
    assert r.returncode == 0, r.stderr[-3000:]
    judgments = read_jsonl(tmp_path / "mix/rounds/000000/judgments.jsonl")
    judged = [j for j in judgments if j["verdict"] != "identical"]
    assert judged and all(j["backend"] == "mix(transformers*1,rules*3)" for j in judgments)
    assert all(j["constitution"] == "harmless+concise" for j in judgments)
    for j in judged:
        for o in j["orders"]:
            assert "transformers/harmless w=1: rationale=" in o["raw"] and "rules/concise w=3: score_1=" in o["raw"]
    # The rules member outweighs the judge: the shorter response always wins, whatever the judge says.
    pairs = read_jsonl(tmp_path / "mix/rounds/000000/pairs.jsonl")
    assert pairs and all(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
    m = read_jsonl(tmp_path / "mix/metrics.jsonl")[0]
    assert m["annotate/cache_misses"] == 2 * len(judged) and m["annotate/completion_tokens"] > 0


def test_principles_sample_reaches_every_member_with_a_constitution(tiny_model, tmp_path):
    """`annotate.principles: sample` is handed to each member's constitution, in a mix as
    alone (one principle per comparison, drawn alike in both orders: tests/test_annotators.py)."""
    from oaif.annotate.base import leaf_annotators
    from oaif.annotate.backends import build_annotator
    from oaif.config import load_config

    config = tmp_path / "mix.yaml"
    for principles in ("sample", "all"):
        config.write_text(f"""
policy: {{model: {tiny_model}}}
annotate:
  backend: mix
  principles: {principles}
  cache: ""
  mix:
    - {{backend: transformers, constitution: constitutions/harmless.yaml}}
    - {{backend: rules, constitution: constitutions/concise.yaml}}
    - {{backend: transformers, constitution: constitutions/helpful.yaml}}
""")
        members = list(leaf_annotators(build_annotator(load_config(config))))
        assert [m.constitution.name for m in members] == ["harmless", "concise", "helpful"]
        assert [m.constitution.sample_principles for m in members] == [principles == "sample"] * 3
        single = load_config(None, [f"policy.model={tiny_model}", "annotate.backend=transformers",
                                    f"annotate.principles={principles}", "annotate.cache="])
        assert build_annotator(single).constitution.sample_principles == (principles == "sample")


def test_a_round_whose_prompts_are_all_too_long_is_recorded_not_fatal(tiny_model, tmp_path):
    """Regression: every prompt over policy.max_prompt_tokens leaves a round with no samples;
    it is counted and skipped (no training, no sync), and the run goes on."""
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=long", "rounds=2", "prompts_per_round=4", "policy.max_prompt_tokens=3")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "long/metrics.jsonl")
    assert [m["generate/prompts_skipped"] for m in metrics] == [4, 4]
    assert all(m["pairs_kept"] == 0 and m["generate/mean_length"] is None and "train/loss" not in m for m in metrics)
    assert "mean response length - -> - tokens" in r.stdout


def test_async_rounds_sample_the_next_round_while_the_trainer_trains(tiny_model, tmp_path):
    """async_rounds=1: the engine, in its own process, draws round k's samples from the policy
    as it was before round k-1's update (one update old, recorded in each sample), and the run
    still learns 'shorter'; evaluation waits for the next round's samples in flight."""
    common = [f"policy.model={tiny_model}", f"output_dir={tmp_path}"]
    evaluated = ["eval.every=4", "eval.max_prompts=4"]
    r = oaif_main("run", "configs/tiny_cpu.yaml", *common, *evaluated, "name=async", "rounds=8", "async_rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "async/metrics.jsonl")
    assert ["eval/win_rate_vs_ref" in m for m in metrics] == [False] * 3 + [True] + [False] * 3 + [True]
    versions = versions_follow_training(metrics, trained_at_least=6)
    for k in range(8):
        drawn_by = versions[k - 2] if k >= 2 else 0   # requested during round k-1, before it trained
        for name in ("samples", "pairs"):
            rows = read_jsonl(tmp_path / f"async/rounds/{k:06d}/{name}.jsonl")
            assert {s["policy_version"] for s in rows} <= {drawn_by} and (rows or name == "pairs"), (k, name)
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"mean length {first:.1f} -> {last:.1f}: the policy did not learn 'shorter'"
    # Killed after round 3's metrics line, before its checkpoint, and resumed from round 2's:
    # round 3's samples, drawn from the weights before round 2's update, come back from the
    # checkpoint, and every record is the uninterrupted run's.
    killed = run_oaif("run", "configs/tiny_cpu.yaml", *common, *evaluated, "name=killed", "rounds=8", "async_rounds=1",
                      "train.checkpoint_every=1", env={**os.environ, "OAIF_CRASH_AT": "metrics:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    r = oaif_main("resume", str(tmp_path / "killed"))
    assert r.returncode == 0 and "resuming" in r.stdout and "after round 2" in r.stdout, r.stderr[-3000:]
    for k in range(8):
        for name in ("samples", "judgments", "pairs"):
            assert (tmp_path / f"killed/rounds/{k:06d}/{name}.jsonl").read_bytes() == \
                (tmp_path / f"async/rounds/{k:06d}/{name}.jsonl").read_bytes(), (k, name)
    for name in ("baseline", "round_000003", "round_000007"):
        assert read_jsonl(tmp_path / f"killed/eval/{name}.jsonl") == read_jsonl(tmp_path / f"async/eval/{name}.jsonl")
    # Round 0 is the starting policy with round 0's seeds in either mode: the engine process
    # samples exactly what the in-process engine does.
    r = oaif_main("run", "configs/tiny_cpu.yaml", *common, "name=sync", "rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "async/rounds/000000/samples.jsonl").read_bytes() == \
        (tmp_path / "sync/rounds/000000/samples.jsonl").read_bytes()


def test_a_batch_larger_than_one_prefill_samples_with_every_seed(tiny_model):
    """640 seeded requests (80 prompts x 8) overflow one scheduler step's token budget. With
    chunked prefill, vLLM rewound each chunked request's seeded generator, which fails on a
    CPU ("CPU Generator does not use offset"); the engine prefills whole prompts instead,
    and the same seeds still draw the same samples."""
    from transformers import AutoTokenizer

    from oaif.config import GenerateConfig
    from oaif.datasets_io import load_prompts
    from oaif.engine.vllm import InProcessEngine, build_llm, shutdown_llm
    from oaif.generate import Generator

    llm = build_llm(str(tiny_model), "float32", seed=0, kv_cache_gib=0.25, max_model_len=192, enforce_eager=True)
    try:
        gen = Generator(InProcessEngine(llm), AutoTokenizer.from_pretrained(tiny_model),
                        GenerateConfig(samples_per_prompt=8, max_new_tokens=16), max_prompt_tokens=128)
        prompts = load_prompts(ROOT / "prompts/system_prompts.jsonl")
        assert len(prompts) * 8 * 40 > llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens, \
            "the batch must be larger than one step's token budget, else this checks nothing"
        first, _ = gen.sample(prompts, 0, 0)
        again, _ = gen.sample(prompts, 0, 0)
    finally:
        shutdown_llm(llm)
    assert sum(len(g) for g in first) == 640
    assert [[s.token_ids for s in g] for g in first] == [[s.token_ids for s in g] for g in again]
