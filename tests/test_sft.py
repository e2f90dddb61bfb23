"""`oaif sft`: the rows it reads, the loss it trains (response tokens only, EOS included),
a policy moved toward its data through the CLI, a merged LoRA model that vLLM serves, and
its errors. The starting model is the tiny policy's random initialisation (init-tiny with 0
warm-up steps: seconds, where the trained one takes a minute), so that a few steps visibly
teach it a fixed answer it could not have given before."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oaif.config import ConfigError, GenerateConfig, SFTConfig, load_config
from oaif.datasets_io import load_prompts
from oaif.generate import Generator
from oaif.records import Prompt, read_jsonl
from oaif.pipeline.sft import load_examples, response_nll, run_sft
from oaif.pipeline.tiny import init_tiny

from conftest import ROOT, hf_greedy, oaif_main, untimed

ANSWER = "The answer is marmalade."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny policy's random initialisation, with its tokenizer and chat template."""
    return init_tiny(tmp_path_factory.mktemp("sft") / "base", steps=0, log=lambda _: None)


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    """64 prompts of the tiny policy's warm-up data, every one answered with ANSWER."""
    rows = read_jsonl(ROOT / "prompts/tiny_sft.jsonl")[:64]
    return write(tmp_path_factory.mktemp("data") / "marker.jsonl",
                 [{"messages": [r["messages"][0], {"role": "assistant", "content": ANSWER}]} for r in rows])


def greedy_texts(model_dir, n=4):
    """Greedy answers (transformers) to held-out prompts, special tokens kept: EOS shows."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = Generator(None, tokenizer, GenerateConfig(), max_prompt_tokens=128)
    ids = [gen.encode(p) for p in load_prompts(ROOT / "prompts/heldout.jsonl")[:n]]
    return [tokenizer.decode(hf_greedy(model, i, 24, tokenizer.eos_token_id)) for i in ids]


def test_rows_in_every_format_give_the_loops_prompt_tokens_and_the_response_with_eos(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    prompt, answer = CHAT, "Blue."
    # The prompt as the loop's generator renders it; the response as its engine samples it: + EOS.
    expected = (Generator(None, tok, GenerateConfig(), max_prompt_tokens=10**6).encode(Prompt("p", prompt)),
                tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    cfg = SFTConfig()
    trl_rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}]
    datasets.Dataset.from_list(trl_rows).to_parquet(str(tmp_path / "trl.parquet"))   # TRL's conversational form
    datasets.DatasetDict({"train": datasets.Dataset.from_list(trl_rows)}).save_to_disk(str(tmp_path / "disk"))
    sources = [write(tmp_path / "messages.jsonl", [{"messages": prompt + [{"role": "assistant", "content": answer}]}]),
               write(tmp_path / "completion.jsonl", [{"prompt": prompt, "completion": answer}]),
               write(tmp_path / "response.jsonl", [{"prompt": prompt, "response": answer}]),
               tmp_path / "trl.parquet", tmp_path / "disk"]
    for source in sources:
        assert load_examples(source, tok, cfg) == [expected], source
    # A text prompt is one user turn, as in a prompt file.
    [(text_prompt, _)] = load_examples(write(tmp_path / "t.jsonl", [{"prompt": "Hi.", "completion": "Yo."}]), tok, cfg)
    assert text_prompt == Generator(None, tok, GenerateConfig(), 10**6).encode(
        Prompt("p", [{"role": "user", "content": "Hi."}]))


def test_the_loss_is_the_response_tokens_nll_prompt_masked_eos_included(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rows = [{"messages": CHAT + [{"role": "assistant", "content": "Green, or blue."}]},
            {"prompt": "Say hi.", "completion": "Hi."}]
    examples = load_examples(write(tmp_path / "d.jsonl", rows), tok, SFTConfig())

    def by_hand(prompt_ids, response_ids):
        """-Σ log p(response token | everything before it), from one plain forward pass."""
        ids = torch.tensor([prompt_ids + response_ids])
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return -sum(logps[len(prompt_ids) + k - 1, t] for k, t in enumerate(response_ids)).item()

    with torch.no_grad():
        for prompt_ids, response_ids in examples:
            assert response_ids[-1] == tok.eos_token_id
            assert response_nll(model, [(prompt_ids, response_ids)], tok.pad_token_id).item() == pytest.approx(
                by_hand(prompt_ids, response_ids), rel=1e-5)
        # Batched: the padding counts for nothing either.
        assert response_nll(model, examples, tok.pad_token_id).item() == pytest.approx(
            sum(by_hand(*e) for e in examples), rel=1e-5)


def test_oaif_sft_moves_the_policy_toward_its_data(base, marker_data, tmp_path):
    before = greedy_texts(base)
    assert not any("marmalade" in t for t in before), before

    out = tmp_path / "sft"
    r = oaif_main("sft", str(marker_data), "configs/tiny_cpu.yaml", f"policy.model={base}", "sft.learning_rate=3e-3",
                 "sft.epochs=4", "sft.batch_size=8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    steps = read_jsonl(out / "sft_metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 33))   # 4 epochs × 64 rows / 8 per step
    assert sum(s["loss"] for s in steps[-4:]) / 4 < steps[0]["loss"] / 5, [s["loss"] for s in steps]
    assert not (tmp_path / ".sft.tmp").exists()   # built beside --out, then renamed

    after = greedy_texts(out)
    # The trained answer, ended: EOS was learned with it.
    assert after == [ANSWER + "<|end|>"] * len(after), after


def test_lora_sft_saves_a_merged_model_that_vllm_serves(base, marker_data, tmp_path):
    from oaif.engine.vllm import build_llm, shutdown_llm

    out = tmp_path / "lora"
    cfg = load_config("configs/tiny_cpu.yaml", [f"policy.model={base}", "train.lora.enabled=true",
                                                "sft.learning_rate=1e-2", "sft.epochs=4", "sft.batch_size=8"])
    run_sft(cfg, marker_data, out, log=lambda _: None)
    assert not (out / "adapter_config.json").exists()   # a plain model, not an adapter
    merged, start = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (out, base))
    # LoRA: the adapted projections moved, the embeddings (no adapter) did not.
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], start["model.embed_tokens.weight"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = [Generator(None, tokenizer, GenerateConfig(), 128).encode(p)
           for p in load_prompts(ROOT / "prompts/heldout.jsonl")[:4]]
    hf = [hf_greedy(model, i, 24, tokenizer.eos_token_id) for i in ids]
    assert all("marmalade" in tokenizer.decode(h) for h in hf), [tokenizer.decode(h) for h in hf]
    llm = build_llm(str(out), "float32", seed=0, kv_cache_gib=0.25, max_model_len=256, enforce_eager=True)
    try:
        from vllm import SamplingParams, TokensPrompt

        served = [list(o.outputs[0].token_ids) for o in llm.generate(
            [TokensPrompt(prompt_token_ids=i) for i in ids], SamplingParams(temperature=0, max_tokens=24),
            use_tqdm=False)]
    finally:
        shutdown_llm(llm)
    assert served == hf


@pytest.mark.parametrize("rows, error", [
    ([{"prompt": "Hi.", "completion": "Yo."}, {"prompt": "Say hi."}], ":2: no response"),
    ([{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."},
                    {"role": "user", "content": "And?"}]}], ":1: 'messages' ends with a 'user' turn"),
    ([{"prompt": "Hi.", "completion": "  "}], ":1: the response is empty"),
    ([{"text": "Hi."}], ":1: no response"),
    ([], "no rows"),
    ([{"prompt": "Hi, how are you today?", "completion": "Very well, thank you."}] * 2,
     "every row is longer than sft.max_tokens=8"),
])
def test_bad_rows_are_errors_that_name_file_row_and_field(base, tmp_path, rows, error):
    tok = AutoTokenizer.from_pretrained(base)
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match="^" + str(path)) as e:
        load_examples(path, tok, SFTConfig(max_tokens=8))
    assert error in str(e.value)


def test_rows_over_max_tokens_are_left_out_and_counted(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    logged = []
    rows = [{"prompt": "Hi.", "completion": "Yo."}, {"prompt": "Hi.", "completion": "Yo, " * 20}]
    examples = load_examples(write(tmp_path / "d.jsonl", rows), tok, SFTConfig(max_tokens=16), logged.append)
    assert len(examples) == 1 and logged == ["sft: left out 1 of 2 rows longer than sft.max_tokens=16 (rows 2)"]


def test_cli_errors_exit_2_naming_the_problem_and_leave_out_alone(base, tmp_path):
    with pytest.raises(ConfigError, match="sft.epoch: unknown key .*did you mean 'sft.epochs'"):
        load_config("configs/tiny_cpu.yaml", ["sft.epoch=2"])
    with pytest.raises(ConfigError, match="sft.batch_size: must be > 0"):
        load_config("configs/tiny_cpu.yaml", ["sft.batch_size=0"])

    cfg = load_config("configs/tiny_cpu.yaml", [f"policy.model={base}"])
    with pytest.raises(FileNotFoundError, match=f"SFT data {tmp_path / 'missing.jsonl'} not found"):
        run_sft(cfg, tmp_path / "missing.jsonl", tmp_path / "a", log=lambda _: None)
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "Hi.", "completion": "Yo."}, {"prompt": "Say hi."}])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{taken} exists: pass --overwrite"):
        run_sft(cfg, bad, taken, log=lambda _: None)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    # Through the command: one line naming the file, the row and what is missing; exit code 2.
    r = oaif_main("sft", str(bad), "configs/tiny_cpu.yaml", f"policy.model={base}", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and f"oaif: error: {bad}:2: no response" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_init_tiny_builds_the_same_bytes_every_time(tmp_path):
    """`oaif init-tiny` twice gives the same files, byte for byte: seeded data, seeded init and
    a deterministic training (here 10 of its steps, so that training is part of what is
    compared: the default build takes minutes)."""
    from oaif.pipeline.tiny import init_tiny

    builds = [init_tiny(tmp_path / name, steps=10, log=lambda _: None) for name in ("a", "b")]
    files = sorted(p.relative_to(builds[0]) for p in builds[0].rglob("*") if p.is_file())
    assert "model.safetensors" in map(str, files)
    assert files == sorted(p.relative_to(builds[1]) for p in builds[1].rglob("*") if p.is_file())
    # Every file but the training log, whose lines carry their step's seconds.
    assert [f for f in files if (builds[0] / f).read_bytes() != (builds[1] / f).read_bytes()] == \
        [Path("sft_metrics.jsonl")]
    logs = [[untimed(m) for m in read_jsonl(b / "sft_metrics.jsonl")] for b in builds]
    assert len(logs[0]) == 10 and logs[0] == logs[1]
