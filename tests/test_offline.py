"""`oaif offline`: the pair-file formats it reads, its errors, and a run through the CLI."""

import json

import pytest
from transformers import AutoTokenizer

from oaif.datasets_io import load_pairs
from oaif.records import read_jsonl

from conftest import oaif_main


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_text_pairs_annotate_output_and_oaif_records(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Red is a colour, and so is blue."},
        {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi.", "rejected": "Hello there!",
         "p_chosen": 0.8},
        {"prompt": "Pick one.", "a": "long answer here", "b": "short", "verdict": "b", "p_a": 0.1},
        {"prompt": "Pick one.", "a": "x", "b": "y", "verdict": "tie", "p_a": 0.5},
    ]
    pairs, skipped = load_pairs(write(tmp_path / "p.jsonl", rows), tok, max_prompt_tokens=256)
    assert skipped == {"no_preference": 1, "prompt_too_long": 0}
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("Red.", "Red is a colour, and so is blue."), ("Hi.", "Hello there!"), ("short", "long answer here")]
    assert [p.p_chosen for p in pairs] == [1.0, 0.8, pytest.approx(0.9)]
    first = pairs[0]
    assert first.chosen_token_ids == tok("Red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(first.prompt_token_ids).count("Name a colour.") == 1

    # oaif's own records go through unchanged (exact token ids), so round 0 of a run is a valid file.
    own = write(tmp_path / "own.jsonl", [json.dumps(__import__("dataclasses").asdict(first))])
    [again], _ = load_pairs(own, tok, max_prompt_tokens=256)
    assert again == first


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "p.jsonl:2: expected 'chosen' and 'rejected' strings"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "p.jsonl:2: 'prompt' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 2}, "p.jsonl:2: 'p_chosen' must be a probability"),
    ({"chosen_token_ids": [1]}, "p.jsonl:2: an oaif pair record needs"),
    ("{not json", "p.jsonl:2: not a JSON record"),
])
def test_bad_rows_name_the_line(tiny_model, tmp_path, row, message):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_pairs(path, tok, max_prompt_tokens=256)


def test_offline_run_through_the_cli_learns_its_pairs(tiny_model, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": f"Well, about question {i}, it depends."}
            for i in range(12)]
    pairs = write(tmp_path / "pairs.jsonl", rows)
    r = oaif_main("offline", str(pairs), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 f"output_dir={tmp_path}", "name=offline", "rounds=3", "train.batch_size=4", "train.epochs_per_round=1")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "offline/metrics.jsonl")
    assert [m["train/steps"] for m in metrics] == [3, 6, 9]
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] and metrics[-1]["train/reward_accuracy"] == 1.0
    assert len(read_jsonl(tmp_path / "offline/pairs.jsonl")) == 12
    assert (tmp_path / "offline/checkpoints/round_000002/policy/model.safetensors").is_file()

    # Bad input: a clear error naming the file, a non-zero exit, and no run directory.
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    r = oaif_main("offline", str(bad), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 f"output_dir={tmp_path}", "name=bad")
    assert r.returncode == 2 and "bad.jsonl:1: expected 'chosen' and 'rejected'" in r.stderr
    assert not (tmp_path / "bad").exists()
