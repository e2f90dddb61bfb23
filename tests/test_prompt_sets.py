"""The bundled prompt sets: they load, the held-out sets never overlap the training set, and
every reference question can be graded."""

import pytest

from oaif.constitution import _words
from oaif.datasets_io import load_prompts

from conftest import ROOT

FILES = ["train.jsonl", "heldout.jsonl", "heldout_qa.jsonl"]


@pytest.fixture(scope="module")
def sets():
    return {name: load_prompts(ROOT / "prompts" / name) for name in FILES}


def test_held_out_sets_are_disjoint_from_training(sets):
    ids = [p.id for prompts in sets.values() for p in prompts]
    assert len(ids) == len(set(ids))
    text = lambda p: _words(p.messages[-1]["content"]).strip()  # noqa: E731 (case and punctuation blind)
    train = {text(p) for p in sets["train.jsonl"]}
    for name in ("heldout.jsonl", "heldout_qa.jsonl"):
        assert not train & {text(p) for p in sets[name]}, name
    assert len(sets["heldout.jsonl"]) >= 100 and len(sets["heldout_qa.jsonl"]) >= 100 and len(sets["train.jsonl"]) >= 300


def test_reference_questions_can_be_graded(sets):
    for p in sets["heldout_qa.jsonl"]:
        assert p.references, p.id
        question = _words(p.messages[-1]["content"])
        # An answer found in the question itself would make every echo "correct".
        assert not any(_words(r) in question for r in p.references), p.id
    assert not any(p.references for p in sets["heldout.jsonl"])
