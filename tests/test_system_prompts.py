"""System prompts the `rules` backend checks, and multi-turn conversations (generate.turns)."""

import pytest

from oaif.annotate.base import JudgeRequest
from oaif.annotate.rules import RulesAnnotator
from oaif.constitution import ConstitutionError, load_constitution
from oaif.datasets_io import load_prompts
from oaif.records import read_jsonl

from conftest import ROOT, oaif_main

CONSTITUTION = ROOT / "constitutions/system_prompt.yaml"
SYSTEM_RULES = load_constitution(CONSTITUTION).rules


def p_first(rule: str, system: str | None, x: str, y: str, tmp_path) -> list[float]:
    """P(first better) under one rule, with x shown first, then y, in a conversation whose
    system prompt is `system` (None: no system message)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"name: t\npreamble: p\nprinciples: [p]\nrules: [{rule}]\n")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": "q"}]
    judge = RulesAnnotator(load_constitution(path))
    return [a.p_first for a in judge.judge([JudgeRequest(messages, x, y), JudgeRequest(messages, y, x)])]


@pytest.mark.parametrize("rule, system, better, worse, expected", [
    # A word limit: at most N words (the limit itself passes); both within or both over: a tie.
    ("{check: system_word_limit}", "Answer in at most 3 words.", "It is Paris.", "The capital is Paris.", 1.0),
    ("{check: system_word_limit}", "Reply in no more than 3 words.", "Paris.", "It is Paris.", 0.5),
    ("{check: system_word_limit}", "Answer in at most 3 words.", "So it is Paris.", "The capital is Paris.", 0.5),
    ("{check: system_word_limit, pattern: 'under (\\d+) words'}", "Stay under 2 words.", "Paris.", "It is Paris.", 1.0),
    ("{check: system_word_limit, pattern: 'in (\\w+) words'}", "Answer in few words.", "Paris.", "It is Paris.", 0.5),
    # A marker to include: case ignored, not inside a longer word.
    ("{check: system_marker}", "Include the word children.", "Children like it.", "Kids like it.", 1.0),
    ("{check: system_marker}", 'Always include the word "walk" in your answer.', "A short walk.", "Walking.", 1.0),
    ("{check: system_marker}", "Include the word children.", "Childrens like it.", "Kids like it.", 0.5),
    # A prefix: the response starts with it.
    ("{check: system_prefix}", "Start your answer with [FR].", " [FR] Bonjour.", "Bonjour. [FR]", 1.0),
    ("{check: system_prefix}", "Begin each reply with Yes.", "yes, it is.", "It is, yes.", 1.0),
    # A format.
    ("{check: system_format}", "Answer as a bulleted list.", "- one\n* two\n• three", "one, two, three", 1.0),
    ("{check: system_format}", "Answer as a bulleted list.", "- one\n- two", "Here:\n- one\n- two", 1.0),
    ("{check: system_format}", "Give a numbered list.", "1. one\n2) two", "- one\n- two", 1.0),
    ("{check: system_format}", "Reply in JSON only.", '```json\n{"a": 1}\n```', "a is 1", 1.0),
    ("{check: system_format}", "Reply in JSON only.", '{"a": 1}', "{a: 1}", 1.0),
    ("{check: system_format}", "Reply in JSON only.", '["a", 1]', "12", 1.0),     # an object or array
    # No system prompt, or one that states no such constraint: the rule scores nothing, a tie.
    ("{check: system_word_limit}", None, "Paris.", "It is the city of Paris.", 0.5),
    ("{check: system_marker}", "Be kind.", "Children like it.", "Kids like it.", 0.5),
    ("{check: system_format}", "Be brief.", '{"a": 1}', "a is 1", 0.5),
])
def test_each_system_rule_decides_hand_made_pairs_in_both_orders(tmp_path, rule, system, better, worse, expected):
    assert p_first(rule, system, better, worse, tmp_path) == [expected, 1.0 - expected]


def test_the_constraint_is_read_from_the_system_message_only(tmp_path):
    """The same words in a user turn are no system prompt."""
    path = tmp_path / "c.yaml"
    path.write_text("name: t\npreamble: p\nprinciples: [p]\nrules: [{check: system_word_limit}]\n")
    messages = [{"role": "user", "content": "Answer in at most 1 words."}]
    answers = RulesAnnotator(load_constitution(path)).judge([JudgeRequest(messages, "Paris.", "It is Paris.")])
    assert answers[0].p_first == 0.5


@pytest.mark.parametrize("rule, message", [
    ("{check: system_marker, pattern: 'include \\w+'}", "needs exactly one group"),
    ("{check: system_marker, pattern: '(a)(b)'}", "needs exactly one group"),
    ("{check: system_word_limit, pattern: '('}", "not a valid regular expression"),
    ("{check: system_format, text: JSON}", "unknown field(s) ['text']"),
])
def test_system_rule_errors_name_the_field(tmp_path, rule, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: t\npreamble: p\nprinciples: [p]\nrules: [{rule}]\n")
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    assert "rules[0]" in str(e.value) and message in str(e.value)


def follows(sample: dict) -> dict[str, bool]:
    """Whether a sample keeps each constraint its system prompt states, by check name."""
    out = {}
    for rule in SYSTEM_RULES:
        kept = rule.follows_system_prompt(sample["text"], sample["messages"])
        if kept is not None:
            out[rule.check] = kept
    return out


def test_bundled_system_prompt_sets_state_constraints_the_rules_read():
    train, heldout = (load_prompts(ROOT / f"prompts/{name}.jsonl") for name in ("system_prompts", "system_prompts_heldout"))
    assert len(train) >= 64 and len(heldout) >= 20
    for p in train + heldout:
        assert p.messages[0]["role"] == "system" and p.messages[1]["role"] == "user", p.id
        assert follows({"text": "", "messages": p.messages}), f"{p.id}: no rule reads its system prompt"
    kinds = {check for p in train for check in follows({"text": "", "messages": p.messages})}
    assert kinds == {"system_word_limit", "system_marker"}
    conversation = lambda p: tuple((m["role"], m["content"]) for m in p.messages)  # noqa: E731
    assert not {conversation(p) for p in train} & {conversation(p) for p in heldout}
    assert len({p.id for p in train + heldout}) == len(train) + len(heldout)


def follow_rates(run_dir, round: int) -> dict[str, float]:
    """The share of a round's samples that keep their system prompt's constraint: all, and per check."""
    verdicts = [v for s in read_jsonl(run_dir / f"rounds/{round:06d}/samples.jsonl") for v in follows(s).items()]
    rates = {"all": sum(kept for _, kept in verdicts) / len(verdicts)}
    for check in {c for c, _ in verdicts}:
        kept = [k for c, k in verdicts if c == check]
        rates[check] = sum(kept) / len(kept)
    return rates


ROUNDS = 10


def test_a_rules_run_learns_to_follow_the_system_prompt(tiny_model, tmp_path):
    """The tiny policy, trained against constitutions/system_prompt.yaml on prompts whose system
    prompt sets a word limit or a word to include, follows them more often by the last round.
    Measured (seed 0): 23% of round 0's samples followed (word limits 18%, markers 28%),
    70% of round 9's (96%, 50%); with seed=1: 12% (15%, 10%) -> 70% (97%, 31%)."""
    from transformers import AutoTokenizer

    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=system", "prompts=prompts/system_prompts.jsonl",
                 "annotate.constitution=constitutions/system_prompt.yaml", f"rounds={ROUNDS}", "prompts_per_round=32",
                 "train.learning_rate=1.5e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "system"
    # The system message reaches the policy: rendered first by its chat template.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sample = read_jsonl(run_dir / "rounds/000000/samples.jsonl")[0]
    assert tokenizer.decode(sample["prompt_token_ids"]).startswith(f"<|system|>\n{sample['messages'][0]['content']}<|end|>")
    first, last = follow_rates(run_dir, 0), follow_rates(run_dir, ROUNDS - 1)
    assert set(first) == set(last) == {"all", "system_word_limit", "system_marker"}
    assert last["all"] >= first["all"] + 0.25, (first, last)
    assert all(last[check] > first[check] for check in first), (first, last)
    assert sum(m["pairs_kept"] for m in read_jsonl(run_dir / "metrics.jsonl")) >= 50


@pytest.mark.slow
def test_smollm2_chat_template_keeps_the_system_prompt(smollm2_model):
    """SmolLM2's template puts a given system message first, in place of its default one."""
    from oaif.generate import encode_prompt
    from oaif.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_model))
    messages = [{"role": "system", "content": "Answer in at most 5 words."}, {"role": "user", "content": "Hi."}]
    text = tokenizer.decode(encode_prompt(tokenizer, messages))
    assert text.startswith("<|im_start|>system\nAnswer in at most 5 words.<|im_end|>\n<|im_start|>user\nHi.")
    assert "SmolLM" not in text


# Multi-turn conversations.

class EchoEngine:
    """A stand-in policy engine: each completion says how long its prompt was, and it keeps
    the prompts it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def sample(self, prompt_token_ids, seeds, temperature, top_p, max_tokens):
        self.prompts += [self.tokenizer.decode(ids) for ids in prompt_token_ids]
        return [[([], f"said after {len(ids)} tokens", "stop") for _ in row] for ids, row in zip(prompt_token_ids, seeds)]


def test_conversations_grow_by_alternating_turns_and_outgrown_ones_are_counted(tiny_model, tmp_path):
    from oaif.config import GenerateConfig
    from oaif.conversation import extend_conversations
    from oaif.generate import Generator
    from oaif.models import load_tokenizer
    from oaif.records import Prompt

    template = tmp_path / "simulator.txt"
    template.write_text("Write the user's next message.\n{conversation}\n")
    tokenizer = load_tokenizer(str(tiny_model))
    system = {"role": "system", "content": "Include the word walk."}
    # Token counts here: 'long' is 126 tokens, over the limit of 120 at once; 'longish' is 78, but
    # the simulator's prompt for it is 126; 'short' stays under 105 throughout.
    prompts = [Prompt("short", [system, {"role": "user", "content": "Hi."}]),
               Prompt("long", [{"role": "user", "content": "Tell me about rivers. " * 20}]),
               Prompt("longish", [{"role": "user", "content": "Tell me about rivers. " * 12}])]
    engine = EchoEngine(tokenizer)
    cfg = GenerateConfig(turns=3, user_simulator_template=str(template))
    metrics = {}
    grown = extend_conversations(Generator(engine, tokenizer, cfg, max_prompt_tokens=120), prompts, 0, metrics)
    assert [p.id for p in grown] == ["short"] and metrics["generate/conversations_skipped"] == 2
    assert metrics["generate/seconds"] > 0
    # Two more (assistant, user) turns, the system message still first.
    messages = grown[0].messages
    assert messages[:2] == prompts[0].messages and [m["role"] for m in messages] == \
        ["system", "user", "assistant", "user", "assistant", "user"]
    assert all(m["content"].startswith("said after") for m in messages[2:])
    # The user simulator saw the conversation (short's two turns), not the assistant's system prompt.
    simulated = [p for p in engine.prompts if "Write the user's next message." in p]
    assert len(simulated) == 2 and all("User: Hi." in p and "walk" not in p for p in simulated)
    # One turn: the prompts as they are.
    generator, metrics = Generator(engine, tokenizer, GenerateConfig(turns=1), max_prompt_tokens=120), {}
    assert extend_conversations(generator, prompts, 0, metrics) == prompts and metrics == {}


def test_a_three_turn_run_samples_each_pair_at_the_last_turn_of_one_shared_conversation(tiny_model, tmp_path):
    from oaif.generate import encode_prompt
    from oaif.models import load_tokenizer

    turns = 3
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=turns", "prompts=prompts/system_prompts.jsonl", "rounds=2", "prompts_per_round=8",
                 "annotate.constitution=constitutions/system_prompt.yaml", f"generate.turns={turns}",
                 "policy.max_prompt_tokens=384", "generate.max_new_tokens=32")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "turns"
    given = {p.id: p.messages for p in load_prompts(ROOT / "prompts/system_prompts.jsonl")}
    tokenizer = load_tokenizer(str(tiny_model))
    for k in range(2):
        samples = read_jsonl(run_dir / f"rounds/{k:06d}/samples.jsonl")
        assert len(samples) == 16
        by_prompt = {}
        for s in samples:
            messages = s["messages"]
            # The system message first, then 2·(turns−1)+1 alternating turns, the prompt's own user turn first.
            assert messages[:2] == given[s["prompt_id"]]
            assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * (turns - 1) + ["user"]
            # The pair was sampled from this whole conversation.
            assert s["prompt_token_ids"] == encode_prompt(tokenizer, messages)
            by_prompt.setdefault(s["prompt_id"], []).append(s)
        for a, b in by_prompt.values():   # both samples of a pair share the same context
            assert a["messages"] == b["messages"] and a["prompt_token_ids"] == b["prompt_token_ids"]
        pairs = read_jsonl(run_dir / f"rounds/{k:06d}/pairs.jsonl")
        assert all(p["messages"] == by_prompt[p["prompt_id"]][0]["messages"] for p in pairs)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [(m["generate/conversations_skipped"], m["generate/prompts_skipped"]) for m in metrics] == [(0, 0), (0, 0)]
