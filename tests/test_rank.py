"""Ranking n > 2 responses (annotate.ranking) and `oaif best-of-n`."""

import itertools
import json
import math

import pytest

from oaif.annotate.python_fn import FunctionAnnotator
from oaif.annotate.ranking import max_pairs_per_prompt, rank_groups
from oaif.annotate.stage import AnnotateStage
from oaif.config import AnnotateConfig
from oaif.constitution import load_constitution
from oaif.records import read_jsonl

from conftest import ROOT, oaif_main
from test_judge import ScriptedJudge, sample


def shorter(prompt_messages, response_1, response_2) -> float:
    """A graded judge: the shorter response is better, more surely the larger the gap."""
    return 1 / (1 + math.exp((len(response_1) - len(response_2)) / 3))


def judge():
    return FunctionAnnotator(shorter, load_constitution(ROOT / "constitutions/concise.yaml"))


def group(lengths: list[int], prompt_id: str = "p") -> list:
    return [sample("x" * n, k, prompt_id) for k, n in enumerate(lengths)]


def test_round_robin_ranks_by_summed_probability_and_trains_on_best_against_worst():
    groups = [group([10, 3, 7, 1]), group([2, 9, 5, 6], "q")]
    judged, rankings = rank_groups(judge(), groups, "round_robin", "best_worst", 0, 0)
    assert [r.order for r in rankings] == [[3, 1, 2, 0], [0, 2, 3, 1]]
    assert [r.comparisons for r in rankings] == [6, 6] and len(judged.judgments) == 12
    assert rankings[0].scores[3] > rankings[0].scores[1] > rankings[0].scores[2] > rankings[0].scores[0]
    assert [(len(p.chosen), len(p.rejected)) for p in judged.pairs] == [(1, 10), (2, 9)]
    everything, _ = rank_groups(judge(), groups, "round_robin", "all", 0, 0)
    assert len(everything.pairs) == 12 and all(len(p.chosen) < len(p.rejected) for p in everything.pairs)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_knockout_finds_best_and_worst_in_every_order_with_fewer_comparisons(n):
    """Every arrangement of n distinct lengths (byes included): best and worst are right, their
    own comparison is the training pair, and the comparisons stay within the bound."""
    for lengths in itertools.permutations([1, 4, 7, 10, 13, 16][:n]):
        judged, [ranking] = rank_groups(judge(), [group(list(lengths))], "knockout", "best_worst", 0, 0)
        assert lengths[ranking.order[0]] == min(lengths) and lengths[ranking.order[-1]] == max(lengths), lengths
        assert sorted(ranking.order) == list(range(n))
        assert ranking.comparisons == len(judged.judgments) <= max_pairs_per_prompt(n, "knockout", "all")
        [pair] = judged.pairs
        assert (len(pair.chosen), len(pair.rejected)) == (min(lengths), max(lengths))
        # Each comparison once: no pair of samples is judged twice.
        assert len({(j.a, j.b) for j in judged.judgments}) == len(judged.judgments)
    assert max_pairs_per_prompt(8, "knockout", "all") < max_pairs_per_prompt(8, "round_robin", "all") == 28


def test_a_position_biased_judge_gives_no_pair_to_train_on():
    """Best and worst are still named (by the judge's leanings) but their comparison did not
    agree across orders, so nothing is trained on."""
    for ranking in ("round_robin", "knockout"):
        biased = ScriptedJudge([0.9] * 100)   # always prefers whatever is shown first
        judged, _ = rank_groups(biased, [group([5, 1, 9, 3])], ranking, "best_worst", 0, 0)
        assert judged.pairs == [] and {j.verdict for j in judged.judgments} == {"disagree"}
        # Both orders of every comparison were asked.
        assert len(biased.requests) == 2 * len(judged.judgments)


def test_consecutive_is_the_oaif_pairing():
    stage = AnnotateStage(AnnotateConfig())   # ranking consecutive, select.rule random: OAIF's pairs
    stage.annotator = judge()
    judged, rankings, _ = stage([group([5, 1, 9, 3])], 0, 0)
    assert rankings == [] and [(j.a, j.b) for j in judged.judgments] == [(0, 1), (2, 3)]
    assert [(len(p.chosen), len(p.rejected)) for p in judged.pairs] == [(1, 5), (3, 9)]


JUDGE_FILE = '''import math

def judge(prompt_messages, response_1, response_2):
    return 1 / (1 + math.exp((len(response_1) - len(response_2)) / 20))
'''


def test_best_of_n_pairs_have_a_larger_margin_than_random_pairs(tiny_model, tmp_path):
    """Round 0 of two runs from the same policy and seed (a sample's seed depends on its
    place only, so samples 0 and 1 are the same in both): the best-against-worst pair of 4
    responses is judged more surely than the pair (0, 1) of 2, and is what is trained on."""
    (tmp_path / "graded.py").write_text(JUDGE_FILE)
    common = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "rounds=1",
              "annotate.backend=python", f"annotate.python={tmp_path / 'graded.py'}:judge", "generate.enforce_eager=true"]
    r = oaif_main("run", *common, "name=pairs")
    assert r.returncode == 0, r.stderr
    r = oaif_main("run", *common, "name=ranked", "generate.samples_per_prompt=4", "annotate.ranking=round_robin")
    assert r.returncode == 0, r.stderr
    pairs, ranked = (read_jsonl(tmp_path / name / "rounds/000000/pairs.jsonl") for name in ("pairs", "ranked"))
    margin = lambda ps: sum(p["p_chosen"] for p in ps) / len(ps)  # noqa: E731
    assert margin(ranked) > margin(pairs) + 0.05, (margin(ranked), margin(pairs))
    rankings = read_jsonl(tmp_path / "ranked/rounds/000000/rankings.jsonl")
    samples = read_jsonl(tmp_path / "ranked/rounds/000000/samples.jsonl")
    assert len(rankings) == 16 and 0 < len(ranked) <= 16   # one pair per prompt, where best and worst agreed
    assert all(len(r["order"]) == 4 and r["comparisons"] == 6 for r in rankings)
    m = [json.loads(line) for line in (tmp_path / "ranked/metrics.jsonl").read_text().splitlines()][0]
    assert m["annotate/comparisons"] == 6 * len(rankings)
    # The ranked run's export (done at its end) pairs each kept pair with its own judgment.
    assert (tmp_path / "ranked/dataset/preference.parquet").is_file()
    text = {(s["prompt_id"], s["index"]): s["text"] for s in samples}
    by_prompt = {r["prompt_id"]: r for r in rankings}
    for pair in ranked:
        r = by_prompt[pair["prompt_id"]]
        assert pair["chosen"] == text[(r["prompt_id"], r["order"][0])]
        assert pair["rejected"] == text[(r["prompt_id"], r["order"][-1])]

    # oaif best-of-n: the same ranking as a command, each prompt's best response out.
    out = tmp_path / "best.jsonl"
    r = oaif_main("best-of-n", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", "annotate.backend=python",
                 f"annotate.python={tmp_path / 'graded.py'}:judge", "generate.samples_per_prompt=4",
                 "annotate.ranking=knockout", "generate.enforce_eager=true", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert rows and all(len(row["responses"]) == 4 for row in rows)
    for row in rows:
        best = row["completion"][0]["content"]
        assert best == row["responses"][row["ranking"][0]]
        assert len(best) == min(len(t) for t in row["responses"])


def test_best_of_n_refuses_consecutive_and_odd_n_needs_a_ranking(tmp_path):
    r = oaif_main("best-of-n", "configs/tiny_cpu.yaml", "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "annotate.ranking" in r.stderr and not (tmp_path / "x.jsonl").exists()
    r = oaif_main("run", "configs/tiny_cpu.yaml", "generate.samples_per_prompt=3", f"output_dir={tmp_path}")
    assert r.returncode == 2 and "annotate.ranking=round_robin or knockout" in r.stderr
