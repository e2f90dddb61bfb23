"""Clear-cut pairs for checking a judge before training with it: for held-out questions with
reference answers, one response gives the accepted answer and the other another question's
answer (the correct one alternates between a and b). A judge that carries signal prefers the
correct response in both orders; one that does not shows it in `oaif annotate`'s order
agreement, first-position rate and label mass.

    .venv/bin/python scripts/make_judge_check_pairs.py          # writes prompts/judge_check_pairs.jsonl
    .venv/bin/oaif annotate prompts/judge_check_pairs.jsonl --out runs/judge_check.jsonl CONFIG [key=value ...]
"""

import json
from pathlib import Path

from oaif.constitution import matches_reference
from oaif.datasets_io import load_prompts

ROOT = Path(__file__).resolve().parent.parent
N = 24

questions = load_prompts(ROOT / "prompts/heldout_qa.jsonl")
rows = []
for k, q in enumerate(questions[:N]):
    wrong = next(o.references[0] for o in questions[k + 1:] + questions[:k]
                 if not matches_reference(o.references[0], q.references))
    right, other = f"The answer is {q.references[0]}.", f"The answer is {wrong}."
    a, b = (right, other) if k % 2 == 0 else (other, right)
    rows.append({"prompt": q.messages[-1]["content"], "a": a, "b": b, "correct": "a" if k % 2 == 0 else "b",
                 "references": list(q.references)})
with open(ROOT / "prompts/judge_check_pairs.jsonl", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
print(f"wrote {len(rows)} pairs to prompts/judge_check_pairs.jsonl")
