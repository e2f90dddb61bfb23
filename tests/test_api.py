"""The Python API (`import oaif`): the examples run to the end, the CLI and the API give the
same records, a user's judge function is asked like every backend (and its failures are
counted, not fatal), callbacks and `break` stop cleanly, the stages run one at a time, and
an edited constitution is taken up at the next round while a broken edit is refused.

Runs in this process use the real vLLM engine, trainer and sync on the tiny policy."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import oaif
from oaif.annotate.base import JudgeRequest
from oaif.annotate.judge import judge_pairs
from oaif.annotate.python_fn import FunctionAnnotator
from oaif.constitution import load_constitution
from oaif.generate import encode_prompt
from oaif.records import Sample, read_jsonl

from conftest import ROOT, hf_greedy, oaif_main, untimed

FAST = ["prompts_per_round=8", "generate.enforce_eager=true"]


def python(*args: str) -> subprocess.CompletedProcess:
    """A script as a user runs it, from the checkout."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def config(tiny_model: Path, tmp_path: Path, name: str, *overrides: str) -> oaif.RunConfig:
    return oaif.load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                                                             f"name={name}", *FAST, *overrides])


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)   # the shipped config's relative paths (prompts, constitution, template)


def records(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "rounds").rglob("*.jsonl"))}


def test_the_api_and_the_cli_give_the_same_records(tiny_model, tmp_path):
    common = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", "rounds=2", "name=same", *FAST]
    r = oaif_main("run", *common, f"output_dir={tmp_path / 'cli'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = python("examples/basic_run.py", *common, f"output_dir={tmp_path / 'api'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"records in {tmp_path / 'api' / 'same'}" in r.stdout
    cli, api = tmp_path / "cli/same", tmp_path / "api/same"
    assert records(cli) == records(api) and len(records(cli)) == 6
    assert [untimed(m) for m in read_jsonl(cli / "metrics.jsonl")] == \
        [untimed(m) for m in read_jsonl(api / "metrics.jsonl")]
    weights = lambda d: load_file(d / "checkpoints/round_000001/policy/model.safetensors")  # noqa: E731
    a, b = weights(cli), weights(api)
    assert all((a[k] == b[k]).all() for k in a)
    assert (cli / "config.yaml").read_text().replace(str(tmp_path / "cli"), "X") == \
        (api / "config.yaml").read_text().replace(str(tmp_path / "api"), "X")


def test_load_config_takes_a_dict_and_names_bad_keys_as_the_cli_does():
    cfg = oaif.load_config({"rounds": 3, "train": {"loss": "ipo"}}, ["seed=4"])
    assert (cfg.rounds, cfg.seed, cfg.train.loss) == (3, 4, "ipo")
    with pytest.raises(oaif.ConfigError, match=r"train.los: unknown key \(did you mean 'train.loss'\?\)"):
        oaif.load_config({"train": {"los": "ipo"}})
    with pytest.raises(oaif.ConfigError, match="annotate.python: backend 'python' needs"):
        oaif.load_config({"annotate": {"backend": "python"}})
    assert set(oaif.__all__) <= set(dir(oaif))


def test_a_judge_function_is_learned_from_and_named_in_the_records(tiny_model, tmp_path):
    r = python("examples/custom_judge.py", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
               f"output_dir={tmp_path}", "name=people", "rounds=6", *FAST[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("samples mentioning people")][0]
    first, last = (float(x.split()[-1].rstrip(",")) for x in line.split(": ")[1].split(", "))
    # Measured here: 0.53 -> 0.78 over 6 rounds. The function's preference is what moved it.
    assert last > first + 0.1, line
    run_dir = tmp_path / "people"
    judgments = read_jsonl(run_dir / "rounds/000000/judgments.jsonl")
    assert {(j["backend"], j["model"]) for j in judgments} == {("python", "__main__:judge")}
    assert all(len(j["orders"]) == 2 for j in judgments if j["verdict"] != "identical")   # both orders asked
    # Resuming from the CLI cannot import a function from the script that ran: said, and how.
    r = oaif_main("resume", str(run_dir), "rounds=7")
    assert r.returncode == 2 and "annotate.python: __main__:judge was defined in the script" in r.stderr
    assert "oaif.resume(run_dir, annotator=judge)" in r.stderr


JUDGE_FILE = '''
import json
import math

def judge(prompt_messages, response_1, response_2):
    topic = prompt_messages[-1]["content"]
    if "rain" in topic:
        raise ValueError("no opinion on rain")
    if "honey" in topic:
        return math.nan
    return 1.0 if len(response_1) < len(response_2) else 0.0
'''


def test_a_judge_function_from_yaml_whose_failures_are_counted_invalid_and_the_round_goes_on(tiny_model, tmp_path):
    (tmp_path / "myjudge.py").write_text(JUDGE_FILE)
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=yaml",
                 "rounds=2", "prompts_per_round=16", "generate.enforce_eager=true", "annotate.backend=python",
                 f"annotate.python={tmp_path / 'myjudge.py'}:judge", "annotate.max_invalid_rate=1")
    assert r.returncode == 0, r.stderr[-3000:]
    judgments = [j for k in (0, 1) for j in read_jsonl(tmp_path / f"yaml/rounds/{k:06d}/judgments.jsonl")]
    raised = [o["raw"] for j in judgments for o in j["orders"] if "ValueError" in o["raw"]]
    nan = [o["raw"] for j in judgments for o in j["orders"] if "nan" in o["raw"]]
    assert raised and all(x == "error: ValueError: no opinion on rain" for x in raised)
    assert nan and all(x == "invalid: returned nan, not a probability in [0, 1]" for x in nan)
    assert all(j["verdict"] == "invalid" for j in judgments if any("rain" in o["raw"] or "nan" in o["raw"]
                                                                   for o in j["orders"]))
    metrics = read_jsonl(tmp_path / "yaml/metrics.jsonl")
    assert sum(m["annotate/invalid"] for m in metrics) >= 2 and sum(m["pairs_kept"] for m in metrics) > 0
    assert metrics[0]["annotate/errors"] >= 2   # the exceptions, counted by the backend


def test_every_kind_of_bad_answer_is_invalid_with_its_reason():
    constitution = load_constitution(ROOT / "constitutions/concise.yaml")
    answers = iter([ValueError("boom"), math.nan, 2.0, "0.7", True, None, -0.1, math.inf, 0.25, 1])

    def judge(prompt_messages, response_1, response_2):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    got = FunctionAnnotator(judge, constitution).judge([JudgeRequest([], "x", "y")] * 10)
    assert [a.p_first for a in got] == [None] * 8 + [0.25, 1.0]
    assert [a.raw.split(":")[0] for a in got[:8]] == ["error"] + ["invalid"] * 7
    assert got[0].raw == "error: ValueError: boom" and "returned str '0.7'" in got[3].raw
    assert "returned bool True" in got[4].raw and got[5].raw == "invalid: cannot judge (None)"

    @oaif.batched
    def short(prompts, responses_1, responses_2):
        return [0.9][:len(prompts)]   # one value, whatever the batch

    batch = FunctionAnnotator(short, constitution).judge([JudgeRequest([], "a", "b")] * 3)
    assert all(a.p_first is None and a.raw == "error: ValueError: returned 1 values for 3 pairs" for a in batch)

    @oaif.batched
    def by_length(prompts, responses_1, responses_2):
        return [float(len(a) < len(b)) for a, b in zip(responses_1, responses_2)]

    a, b = (Sample(0, 0, "p", [{"role": "user", "content": "q"}], k, t, [1], [2], "stop") for k, t in
            enumerate(("short", "much longer")))
    judged = judge_pairs(FunctionAnnotator(by_length, constitution), [(a, b)], 0, 0)   # both orders, one batch
    assert judged.judgments[0].verdict == "a" and [p.chosen for p in judged.pairs] == ["short"]


def test_python_members_mix_and_the_cache_is_opt_in(tmp_path):
    from oaif.annotate.cache import CachedAnnotator
    from oaif.annotate.backends import build_annotator

    (tmp_path / "myjudge.py").write_text("def judge(m, a, b):\n    return 0.2\n")
    spec = f"{tmp_path / 'myjudge.py'}:judge"
    cfg = oaif.load_config(ROOT / "configs/tiny_cpu.yaml", [
        "annotate.backend=mix", f"annotate.constitution={ROOT}/constitutions/concise.yaml",
        f"annotate.mix=[{{backend: python, python: '{spec}', weight: 3}}, {{backend: rules, weight: 1}}]"])
    answers = build_annotator(cfg).judge([JudgeRequest([], "short", "a longer one")])
    assert answers[0].p_first == pytest.approx((3 * 0.2 + 1 * 1.0) / 4)
    one = ["annotate.backend=python", f"annotate.python={spec}", f"annotate.cache={tmp_path / 'cache.jsonl'}",
           f"annotate.constitution={ROOT}/constitutions/concise.yaml"]
    assert not isinstance(build_annotator(oaif.load_config(ROOT / "configs/tiny_cpu.yaml", one)), CachedAnnotator)
    cached = build_annotator(oaif.load_config(ROOT / "configs/tiny_cpu.yaml", [*one, "annotate.python_cache=true"]))
    assert isinstance(cached, CachedAnnotator) and cached.identity.model == "oaif_judge_myjudge:judge"
    cached.judge([JudgeRequest([], "a", "b")])
    assert len(read_jsonl(tmp_path / "cache.jsonl")) == 2   # its header line and the one judgment
    with pytest.raises(oaif.ConfigError, match="annotate.python: .*myjudge.py has no attribute 'nope'"):
        build_annotator(oaif.load_config(ROOT / "configs/tiny_cpu.yaml",
                                         [*one[:1], f"annotate.python={tmp_path / 'myjudge.py'}:nope", *one[2:]]))


def test_an_edited_constitution_is_judged_with_from_the_next_round_and_a_broken_edit_is_refused(
        tiny_model, tmp_path, at_root):
    working = tmp_path / "constitution.yaml"
    concise = (ROOT / "constitutions/concise.yaml").read_text()
    working.write_text(concise)
    edits = {
        0: concise.replace("- Prefer the response without repetition", "- Prefer plain words.\n  - Prefer the "
                           "response without repetition"),                        # a valid edit
        1: concise + "rules: [oops\n",                                            # not YAML
        2: concise.split("rules:")[0],                                            # no rules: the backend refuses it
    }
    said: list[str] = []

    def edit(metrics, loop):
        if metrics["round"] in edits:
            working.write_text(edits[metrics["round"]])

    cfg = config(tiny_model, tmp_path, "live", "rounds=4", f"annotate.constitution={working}",
                 "annotate.reload_constitution=true")
    run_dir = oaif.run(cfg, callbacks=[edit], log=said.append)
    hashes = [{j["constitution_hash"] for j in read_jsonl(run_dir / f"rounds/{k:06d}/judgments.jsonl")}
              for k in range(4)]
    first, edited = load_constitution(ROOT / "constitutions/concise.yaml").hash, hashes[1]
    assert hashes[0] == {first} and edited != {first} and len(edited) == 1
    assert hashes[2] == hashes[3] == edited   # both broken edits refused: the edited version stays
    changed = [s for s in said if "changed" in s]
    refused = [s for s in said if "is not used" in s]
    assert len(changed) == 1 and changed[0].startswith("  round 1: ")
    assert len(refused) == 2 and "not valid YAML" in refused[0] and "needs a 'rules:' list" in refused[1]
    assert refused[0].startswith("  round 2: ") and refused[1].startswith("  round 3: ")


class Recorder:
    def __init__(self, stop_after: int | None = None, say=None):
        self.stop_after, self.say, self.seen = stop_after, say, []

    def on_round_start(self, index, loop):
        self.seen.append(("start", index))

    def on_round_end(self, metrics, loop):
        self.seen.append(("end", metrics["round"]))
        if metrics["round"] == self.stop_after:
            return oaif.STOP if self.say is None else self.say
        return None

    def on_run_end(self, loop):
        self.seen.append(("run end", loop.index))


def test_a_callback_stop_and_a_break_end_the_run_with_a_checkpoint_that_resumes(tiny_model, tmp_path, at_root):
    said: list[str] = []
    recorder = Recorder(stop_after=1)
    run_dir = oaif.run(config(tiny_model, tmp_path, "cb", "rounds=5"), callbacks=[recorder], log=said.append)
    assert recorder.seen == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("run end", 2)]
    assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
    assert (run_dir / "checkpoints/round_000001").is_dir() and not (run_dir / "checkpoints/round_000000").is_dir()
    assert any("stopped by a callback (oaif.STOP) after round 1" in s for s in said)
    oaif.resume(run_dir, ["rounds=3"], log=said.append)
    assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]

    # oaif.evaluate with a judge function: the run's latest checkpoint against its start.
    def longer_wins(prompt_messages, response_1, response_2):   # what the run was *not* trained for
        return float(len(response_1) > len(response_2)) if len(response_1) != len(response_2) else 0.5

    metrics = oaif.evaluate(oaif.load_config(run_dir / "config.yaml", ["eval.max_prompts=12"]),
                            annotator=longer_wins, log=said.append)
    rows = read_jsonl(run_dir / "evals/round_000002.jsonl")
    assert len(rows) == 12 and {r["backend"] for r in rows} == {"python"}
    assert 0 <= metrics["eval/win_rate_vs_ref"] <= 0.5   # trained shorter: a longer-wins judge does not prefer it
    assert not any("graded by the judge it was trained to please" in s for s in said)
    judged, m = oaif.annotate_pairs(oaif.load_config(run_dir / "config.yaml"),
                                    [{"prompt": "Name a fruit.", "a": "An apple.", "b": "A banana, which is yellow."}],
                                    annotator=longer_wins, log=said.append)
    assert judged[0]["verdict"] == "b" and judged[0]["backend"] == "python" and m["annotate/order_agreement"] == 1

    # Leaving the for loop after round 0: round 0 is checkpointed (checkpoint_every is 5).
    with oaif.Loop(config(tiny_model, tmp_path, "brk", "rounds=5"), log=said.append) as loop:
        for metrics in loop.rounds():
            break
    assert metrics["round"] == 0 and (loop.run_dir / "checkpoints/round_000000").is_dir()
    assert any("stopped by the script after round 0" in s for s in said)

    with pytest.raises(TypeError, match="returned True: return oaif.STOP"):
        oaif.run(config(tiny_model, tmp_path, "bad", "rounds=2"), callbacks=[Recorder(0, say=True)], log=said.append)


def test_the_stages_one_at_a_time_and_a_prompt_set_given_in_code(tiny_model, tmp_path, at_root):
    prompts = ["Describe rain.", [{"role": "user", "content": "Say something about boats."}],
               {"prompt": "Explain summer to me.", "id": "summer"}]
    with oaif.Loop(config(tiny_model, tmp_path, "stages", "rounds=2"), prompts=prompts) as loop:
        groups = loop.generate(prompts)
        assert [len(g) for g in groups] == [2, 2, 2] and groups[2][0].prompt_id == "summer"
        assert all(s.policy_version == 0 for g in groups for s in g)
        judged = loop.annotate(groups)
        assert judged.pairs and all(len(p.chosen) <= len(p.rejected) for p in judged.pairs)   # concise: shorter
        assert loop.metrics["pairs_kept"] == len(judged.pairs)
        check = [encode_prompt(loop.tokenizer, [{"role": "user", "content": f"Tell me about {w}."}])
                 for w in ("rain", "boats", "summer", "bread", "rivers", "music", "trains", "snow")]
        served_before = loop.generator.engine.greedy(check, 32)
        assert loop.train(judged.pairs)["train/steps"] == 2 and loop.policy_version == 1   # epochs_per_round 2
        assert loop.sync() > 0
        # The engine now serves the trained weights: its greedy output is the trained policy's.
        trained = [hf_greedy(loop.trainer.policy, ids, 32, loop.tokenizer.eos_token_id) for ids in check]
        assert loop.generator.engine.greedy(check, 32) == trained
        assert trained != served_before, "training changed no greedy output: the check above would be vacuous"
        again = loop.generate(prompts[:1])
        assert again[0][0].policy_version == 1
    saved = read_jsonl(loop.run_dir / "prompts.jsonl")   # given in code, saved with the run for a resume
    assert [p["id"] for p in saved] == ["0", "1", "summer"]
    assert oaif.load_config(loop.run_dir / "config.yaml").prompts == str(loop.run_dir / "prompts.jsonl")
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected 'messages' \(chat list\) or 'prompt'"):
        oaif.Loop(config(tiny_model, tmp_path, "bad", "rounds=2"), prompts=["ok", {"text": "no"}]).__enter__()
    assert not (tmp_path / "bad").exists()   # bad input: nothing written


def test_the_curriculum_example_switches_constitution_half_way(tiny_model, tmp_path):
    r = python("examples/constitution_curriculum.py", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
               f"output_dir={tmp_path}", "name=cur", "rounds=4", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    names = [{j["constitution"] for j in read_jsonl(tmp_path / f"cur/rounds/{k:06d}/judgments.jsonl")}
             for k in range(4)]
    assert names == [{"detailed"}, {"detailed"}, {"concise"}, {"concise"}]
    pairs = [read_jsonl(tmp_path / f"cur/rounds/{k:06d}/pairs.jsonl") for k in range(4)]
    longer = [sum(len(p["chosen"]) > len(p["rejected"]) for p in ps) / len(ps) for ps in pairs]
    assert min(longer[:2]) > 0.8 and max(longer[2:]) == 0.0, longer   # the data turns at once
    assert "round 2: constitution" in r.stdout and "changed" in r.stdout
    assert [m["round"] for m in read_jsonl(tmp_path / "cur/metrics.jsonl")] == [0, 1, 2, 3]


def test_a_finished_run_leaves_nothing_of_itself_in_the_process(tiny_model, tmp_path):
    # A sweep or a notebook calls oaif.run again and again in one process: once a run returns, its
    # Loop, trainer, policy and engine model (every layer with weights) must be gone, or the process grows by a model a run
    # (it did: vLLM's reload records and an import error's traceback kept them). A fresh process,
    # so that vLLM is first imported inside the run, as in a user's script.
    script = f"""
import gc, json, oaif, torch
cfg = oaif.load_config({str(ROOT / 'configs/tiny_cpu.yaml')!r}, {[f'policy.model={tiny_model}', f'output_dir={tmp_path}',
                                                                  'name=r', 'rounds=2', 'threads=1', *FAST]!r})
run_dir = oaif.run(cfg)
gc.collect()
from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
weighs = lambda o: isinstance(o, torch.nn.Module) and next(o.parameters(recurse=False), None) is not None
alive = sorted({{f"{{type(o).__module__}}.{{type(o).__name__}}" for o in gc.get_objects()
                 if weighs(o) or type(o).__name__ in ("Loop", "PreferenceTrainer")}})
print(json.dumps({{"alive": alive, "records": len(LAYERWISE_INFO), "rounds": len(oaif.records.read_jsonl(run_dir / "metrics.jsonl"))}}))
"""
    r = python("-c", script)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {"alive": [], "records": 0, "rounds": 2}   # two rounds: the weights were reloaded once
