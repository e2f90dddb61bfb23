import hashlib
import re

import pytest

from oaif.annotate.base import JudgeRequest, load_template
from oaif.annotate.rules import RulesAnnotator
from oaif.constitution import ConstitutionError, load_constitution
from oaif.datasets_io import load_prompts
from oaif.records import read_jsonl

from conftest import ROOT

BUNDLED = sorted((ROOT / "constitutions").glob("*.yaml"))
# What each bundled constitution is for: its rule checks, in order, and pairs (better, worse,
# references) that its rules must decide for `better` in both orders. No rules: LLM judges only.
PURPOSE = {
    "code": (["contains", "regex", "max_chars"], [("Use:\n```python\nprint(1)\n```", "Use print(1).", ())]),
    "concise": (["shorter"], [("Paris.", "It is Paris.", ())]),
    "concise_correct": (["matches_reference", "shorter"], [("The answer is Paris.", "Lyon.", ("Paris",)),  # correct,
                                                           ("Paris.", "It is Paris.", ("Paris",))]),      # then short
    "correct": (["matches_reference"], [("Paris, I think.", "Lyon.", ("Paris",))]),
    # Correct first; its coin between equally correct answers: test_random_check_... below.
    "correct_random": (["matches_reference", "random"], [("Lyon, no: Paris.", "Lyon.", ("Paris",))]),
    "detailed": (["longer", "max_chars"], [("Paris, on the Seine.", "Paris.", ()),
                                           ("Paris, on the Seine." * 14, "Paris, on the Seine." * 5, ())]),   # 280 chars
    "harmless": ([], []),
    # Its rule stands in for "accurate" on questions with references; length decides nothing.
    "helpful": (["matches_reference"], [("Paris, on the Seine, I think.", "Lyon.", ("Paris",))]),
    # Its rules read the conversation's system prompt: decided in tests/test_system_prompts.py.
    "system_prompt": (["system_word_limit", "system_marker", "system_prefix", "system_format"], []),
}


def p_first(judge: RulesAnnotator, x: str, y: str, refs: tuple[str, ...] = ()) -> list[float | None]:
    """P(first better) with x shown first, then with y shown first."""
    msgs = [{"role": "user", "content": "q"}]
    return [a.p_first for a in judge.judge([JudgeRequest(msgs, x, y, references=refs),
                                            JudgeRequest(msgs, y, x, references=refs)])]


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_every_bundled_constitution_loads_and_prefers_what_it_is_for(path):
    """Each bundled file loads under its own name, fits the bundled judge template, and its rules do their job."""
    c = load_constitution(path)
    assert c.name == path.stem and c.preamble and c.principles
    assert c.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    load_template(ROOT / "prompts/judge.txt", c)   # usable by LLM judges (examples need {examples})
    checks, pairs = PURPOSE[path.stem]
    assert [r.check for r in c.rules] == checks
    for better, worse, refs in pairs:
        assert p_first(RulesAnnotator(c), better, worse, refs) == [1.0, 0.0], (better, worse)


def test_constitutions_named_in_readme_configs_and_code_are_bundled():
    """Every constitutions/X.yaml a user is pointed at exists, and PURPOSE covers every bundled file."""
    files = [ROOT / "README.md", *(ROOT / "configs").rglob("*.yaml"), *(ROOT / "oaif").rglob("*.py")]
    named = {m for f in files for m in re.findall(r"constitutions/([\w-]+)\.yaml", f.read_text())}
    assert {"concise", "helpful", "correct", "concise_correct", "code", "harmless"} <= named
    assert named <= {p.stem for p in BUNDLED} and set(PURPOSE) == {p.stem for p in BUNDLED}


@pytest.mark.parametrize("rule, first, second, refs, expected", [
    ("{check: shorter}", "ab", "abc", (), 1.0),
    ("{check: shorter}", "abc", "abd", (), 0.5),                        # equal lengths: a tie
    ("{check: longer}", "abc", "ab", (), 1.0),
    ("{check: longer}", "abc", "abd", (), 0.5),
    ("{check: contains, text: Paris}", "It is Paris.", "It is Lyon.", (), 1.0),
    ("{check: contains, text: Paris}", "It is paris.", "It is Lyon.", (), 0.5),     # case-sensitive
    ("{check: not_contains, text: As an AI}", "Paris.", "As an AI, I say Paris.", (), 1.0),
    (r"{check: regex, pattern: '\d+ km'}", "About 40 km away.", "Far away.", (), 1.0),  # anywhere (re.search)
    ("{check: max_chars, limit: 5}", "12345", "123456", (), 1.0),      # at most: the limit itself passes
    ("{check: max_chars, limit: 5}", "1", "12345", (), 0.5),           # both within: a tie, not "shorter"
    ("{check: matches_reference}", "It is 12.", "It is 120.", ("12",), 1.0),         # whole words
    ("{check: matches_reference}", "PARIS!", "London.", ("paris",), 1.0),            # case, punctuation
    ("{check: matches_reference}", "Paris.", "London.", (), None),                   # no references: invalid
])
def test_each_rule_check_decides_hand_made_pairs_in_both_orders(tmp_path, rule, first, second, refs, expected):
    """One rule per constitution: the expected P(first better) with `first` shown first, its complement swapped."""
    path = tmp_path / "c.yaml"
    path.write_text(f"name: t\npreamble: p\nprinciples: [p]\nrules: [{rule}]\n")
    want = [None, None] if expected is None else [expected, 1.0 - expected]
    assert p_first(RulesAnnotator(load_constitution(path)), first, second, refs) == want


def test_random_check_decides_each_pair_the_same_in_both_orders_and_by_nothing_it_reads(tmp_path):
    """The coin: a verdict for every pair of different texts, kept when the order is swapped
    (a flip would drop the pair); a tie for identical texts; about half the pairs to the
    shorter answer, so it steers no length; another seed draws other verdicts."""
    def judge(seed: int) -> RulesAnnotator:
        path = tmp_path / f"coin{seed}.yaml"
        path.write_text(f"name: t\npreamble: p\nprinciples: [p]\nrules: [{{check: random, seed: {seed}}}]\n")
        return RulesAnnotator(load_constitution(path))

    pairs = [(f"Answer {i}.", f"A longer answer, number {i}.") for i in range(400)]
    verdicts = {seed: [p_first(judge(seed), x, y) for x, y in pairs] for seed in (0, 1)}
    for v in verdicts.values():
        assert all(v1 in (0.0, 1.0) and v2 == 1.0 - v1 for v1, v2 in v)
        shorter_won = sum(v1 == 1.0 for v1, _ in v) / len(v)   # each pair's first text is the shorter
        assert 0.42 < shorter_won < 0.58, shorter_won
    assert 0.3 < sum(a != b for a, b in zip(verdicts[0], verdicts[1])) / len(pairs) < 0.7
    assert p_first(judge(0), "Paris.", "Paris.") == [0.5, 0.5]


@pytest.mark.parametrize("body, message", [
    ("name: x\npreamble: p\nprinciples: []\n", "'principles' must be a non-empty list"),
    ("name: x\npreamble: p\nprinciples: [a]\ncolour: red\n", "unknown field(s) ['colour']"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: shortest}]\n", "rules[0].check: unknown check 'shortest'"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: regex}]\n", "check 'regex' needs ['pattern']"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: regex, pattern: '('}]\n", "rules[0].pattern: not a valid"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: random, seed: one}]\n", "rules[0].seed: must be an integer"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: shorter, seed: 1}]\n", "unknown field(s) ['seed']"),
    ("preamble: p\nprinciples: [a]\n", "'name' must be a non-empty string"),
])
def test_constitution_errors_name_file_and_field(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_template_needs_every_placeholder(tmp_path):
    assert load_template(ROOT / "prompts/judge.txt").hash
    path = tmp_path / "t.txt"
    path.write_text("{preamble} {principles} {prompt} {response_1}")
    with pytest.raises(ValueError, match=r"lacks placeholder\(s\) \{response_2\}"):
        load_template(path)


def test_prompt_file_errors_name_the_line(tmp_path):
    assert len(load_prompts(ROOT / "prompts/tiny_prompts.jsonl")) == 80
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": "oops"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'messages' must be"):
        load_prompts(path)
    path.write_text('{"prompt": "hi"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON record"):
        read_jsonl(path)
