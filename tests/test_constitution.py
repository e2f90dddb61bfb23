import pytest

from oaif.annotate.base import load_template
from oaif.constitution import ConstitutionError, load_constitution
from oaif.records import load_prompts, read_jsonl

from conftest import ROOT


@pytest.mark.parametrize("name", ["concise", "helpful"])
def test_bundled_constitutions_load(name):
    c = load_constitution(ROOT / f"constitutions/{name}.yaml")
    assert c.name == name and c.principles and len(c.hash) == 16


def test_rules_score_each_check():
    c = load_constitution(ROOT / "constitutions/concise.yaml")
    assert c.rules[0].score("ab", "abc") == 1.0 and c.rules[0].score("abc", "ab") == 0.0


@pytest.mark.parametrize("body, message", [
    ("name: x\npreamble: p\nprinciples: []\n", "'principles' must be a non-empty list"),
    ("name: x\npreamble: p\nprinciples: [a]\ncolour: red\n", "unknown field(s) ['colour']"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: shortest}]\n", "rules[0].check: unknown check 'shortest'"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: regex}]\n", "check 'regex' needs ['pattern']"),
    ("name: x\npreamble: p\nprinciples: [a]\nrules: [{check: regex, pattern: '('}]\n", "rules[0].pattern: not a valid"),
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
