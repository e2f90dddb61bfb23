"""Your own annotator: a plain Python function in place of an LLM judge.

    python examples/custom_judge.py configs/tiny_cpu.yaml rounds=6 name=people

judge(prompt_messages, response_1, response_2) returns P(response_1 is better), or None when
it cannot judge. oaif asks it about every pair in both orders and keeps the pairs on which
the orders agree, as it does with an LLM judge. This one is a keyword-and-format scorer:
it prefers answers that talk about people, and never an answer cut off mid-sentence. The same
function works from YAML: annotate.backend=python annotate.python=examples/custom_judge.py:judge
"""

import re
import sys

import oaif

KEYWORD = re.compile(r"\bpeople\b", re.IGNORECASE)


def score(response: str) -> float:
    finished = response.rstrip().endswith((".", "!", "?"))
    return len(KEYWORD.findall(response)) + (1.0 if finished else -2.0)


def judge(prompt_messages: list[dict], response_1: str, response_2: str) -> float | None:
    s1, s2 = score(response_1), score(response_2)
    return 0.5 if s1 == s2 else float(s1 > s2)


def keyword_rate(run_dir, round_index: int) -> float:
    """Share of a round's samples that mention the keyword."""
    from oaif.records import read_jsonl

    samples = read_jsonl(run_dir / "rounds" / f"{round_index:06d}" / "samples.jsonl")
    return sum(bool(KEYWORD.search(s["text"])) for s in samples) / len(samples)


if __name__ == "__main__":
    cfg = oaif.load_config(sys.argv[1], sys.argv[2:])
    run_dir = oaif.run(cfg, annotator=judge)
    print(f"samples mentioning people: round 0 {keyword_rate(run_dir, 0):.2f}, "
          f"round {cfg.rounds - 1} {keyword_rate(run_dir, cfg.rounds - 1):.2f}")
