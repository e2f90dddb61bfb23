"""Hugging Face datasets in and out: prompt sets read from datasets, `oaif export-pairs` in
TRL's formats (trained on by TRL's own trainers and by `oaif offline`), and a merged LoRA
export served by vLLM."""

import json
import shutil

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oaif.datasets_io import load_pairs, load_prompts
from oaif.records import read_jsonl

from conftest import ROOT, hf_greedy, oaif_main

FAST = ["rounds=2", "prompts_per_round=8", "generate.enforce_eager=true"]
PROVENANCE = ("backend", "model", "constitution", "constitution_hash", "template_hash")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
# Every shape of a prompt-file row: chat messages with an id and accepted answers, a row
# with neither (its id is its position), a plain 'prompt' string.
ROWS = [{"id": "a", "messages": CHAT, "references": ["red", "blue"]},
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"id": "c", "prompt": "Count to three."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_sets_from_parquet_save_to_disk_and_load_dataset_equal_the_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "p.jsonl", ROWS)
    expected = load_prompts(jsonl)
    assert [p.id for p in expected] == ["a", "1", "c"] and expected[0].references == ("red", "blue")
    folder = tmp_path / "data"   # a folder of data files: what load_dataset takes
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    table = datasets.load_dataset(str(folder), split="train")   # columns = the union of the rows' keys
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": table, "test": table.select([2])}).save_to_disk(str(tmp_path / "dict"))
    for source in (tmp_path / "p.parquet", tmp_path / "disk", tmp_path / "dict", folder):
        assert load_prompts(source, "prompts") == expected, source
    assert load_prompts(tmp_path / "dict", "prompts", split="test") == expected[2:]

    # TRL's prompt datasets: 'prompt' holding chat messages; any other column with prompts_column.
    trl_style = datasets.Dataset.from_list([{"prompt": CHAT, "question": "Name a colour."}])
    trl_style.to_parquet(str(tmp_path / "trl.parquet"))
    [chat] = load_prompts(tmp_path / "trl.parquet", "prompts")
    assert chat.messages == CHAT
    [text] = load_prompts(tmp_path / "trl.parquet", "prompts", column="question")
    assert text.messages == [{"role": "user", "content": "Name a colour."}]
    (tmp_path / "q.csv").write_text("id,question\nq1,Name a colour.\n")
    assert load_prompts(tmp_path / "q.csv", "prompts", column="question") == [
        type(text)(id="q1", messages=text.messages)]


def test_a_wrong_column_or_split_is_a_clear_error(tiny_model, tmp_path):
    datasets.Dataset.from_list([{"id": "a", "question": "Name a colour."}]).to_parquet(str(tmp_path / "q.parquet"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"prompts: no 'messages' or 'prompt' column in .*q\.parquet "
                                         r"\(columns: id, question\); set prompts_column"):
        load_prompts(tmp_path / "q.parquet")
    with pytest.raises(ValueError, match=r"eval\.prompts: no column 'answer' .*set eval\.prompts_column"):
        load_prompts(tmp_path / "q.parquet", "eval.prompts", column="answer")
    with pytest.raises(ValueError, match=r"prompts: split 'train' not in .*dict \(splits: test\); set prompts_split"):
        load_prompts(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: no 'question' \(the prompt's key, from prompts_column\)"):
        load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS), column="question")
    with pytest.raises(FileNotFoundError, match=r"prompt file .*nope\.parquet not found"):
        load_prompts(tmp_path / "nope.parquet")

    # The eval.* keys reach the loader: `oaif eval` stops on them before any model loads.
    r = oaif_main("eval", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 f"eval.prompts={tmp_path / 'q.parquet'}", "eval.prompts_column=answer")
    assert r.returncode == 2 and "eval.prompts: no column 'answer'" in r.stderr, r.stderr[-2000:]
    r = oaif_main("eval", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 f"eval.prompts={tmp_path / 'dict'}", "eval.prompts_split=validation")
    assert r.returncode == 2 and "split 'validation' not in" in r.stderr and "set eval.prompts_split" in r.stderr


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A real tiny run (its prompt set a save_to_disk folder) and `oaif export-pairs` of it."""
    tmp = tmp_path_factory.mktemp("export")
    prompts = tmp / "prompts"
    datasets.Dataset.from_list(read_jsonl(ROOT / "prompts/tiny_prompts.jsonl")).save_to_disk(str(prompts))
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp}", "name=x",
                 f"prompts={prompts}", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    r = oaif_main("export-pairs", str(tmp / "x"), "--out", str(tmp / "export"))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "x", tmp / "export"


def test_export_rows_are_the_runs_pairs_with_their_judgments_provenance(exported, tmp_path):
    run_dir, out = exported
    pairs = [p for d in sorted((run_dir / "rounds").iterdir()) for p in read_jsonl(d / "pairs.jsonl")]
    assert len(pairs) >= 8 and {p["round"] for p in pairs} == {0, 1}
    preference = datasets.load_from_disk(str(out / "preference")).to_list()
    assert [(r["prompt"], r["chosen"], r["rejected"], r["p_chosen"], r["round"], r["policy_version"], r["prompt_id"])
            for r in preference] == [
        (p["messages"], [{"role": "assistant", "content": p["chosen"]}],
         [{"role": "assistant", "content": p["rejected"]}], p["p_chosen"], p["round"], p["policy_version"],
         p["prompt_id"]) for p in pairs]
    judgments = [j for d in sorted((run_dir / "rounds").iterdir()) for j in read_jsonl(d / "judgments.jsonl")]
    assert {tuple(r[k] for k in PROVENANCE) for r in preference} == {tuple(j[k] for k in PROVENANCE) for j in judgments}
    assert preference[0]["backend"] == "rules" and preference[0]["constitution"] == "concise"
    parquet = datasets.load_dataset("parquet", data_files=str(out / "preference.parquet"), split="train")
    assert parquet.to_list() == preference

    kto = datasets.load_from_disk(str(out / "kto")).to_list()
    assert [(r["prompt"], r["completion"][0]["content"], r["label"]) for r in kto] == [
        x for p in pairs for x in ((p["messages"], p["chosen"], True), (p["messages"], p["rejected"], False))]
    assert datasets.load_dataset("parquet", data_files=str(out / "kto.parquet"), split="train").to_list() == kto

    # Each pair's provenance is its own judgment's: in a copy of the run every judgment gets its
    # own model name, and each exported pair must carry the one of the judgment of its samples.
    from oaif.datasets_io import export_pairs

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for d in (copy / "rounds").iterdir():
        write_jsonl(d / "judgments.jsonl", [{**j, "model": f"judge-{j['round']}-{i}"}
                                            for i, j in enumerate(read_jsonl(d / "judgments.jsonl"))])
    rows = datasets.load_from_disk(str(export_pairs(copy, tmp_path / "e") / "preference")).to_list()
    for row in rows:
        d = copy / "rounds" / f"{row['round']:06d}"
        text = {(s["prompt_id"], s["index"]): s["text"] for s in read_jsonl(d / "samples.jsonl")}
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        [j] = [j for j in read_jsonl(d / "judgments.jsonl") if j["prompt_id"] == row["prompt_id"]
               and {text[(j["prompt_id"], j["a"])], text[(j["prompt_id"], j["b"])]} == {chosen, rejected}]
        a, b = text[(j["prompt_id"], j["a"])], text[(j["prompt_id"], j["b"])]
        assert (a, b) == ((chosen, rejected) if j["verdict"] == "a" else (rejected, chosen))
        assert row["model"] == j["model"]
    assert len({r["model"] for r in rows}) == len(rows) == len(pairs)


def test_export_refuses_a_non_run_an_existing_out_and_records_that_no_longer_line_up(exported, tmp_path):
    run_dir, out = exported
    r = oaif_main("export-pairs", str(run_dir / "rounds"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "is not an oaif run directory" in r.stderr
    r = oaif_main("export-pairs", str(run_dir), "--out", str(out))
    assert r.returncode == 2 and "exists: pass --overwrite" in r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = oaif_main("export-pairs", str(run_dir), "--out", str(tmp_path / "mine"), "--overwrite")
    assert r.returncode == 2 and "not an oaif pair export" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    from oaif.datasets_io import export_pairs

    again = export_pairs(run_dir, tmp_path / "again")
    assert export_pairs(run_dir, again, overwrite=True) == again   # an earlier export is replaced whole
    assert sorted(p.name for p in again.iterdir()) == [".oaif-output", "kto", "kto.parquet", "preference",
                                                       "preference.parquet"]
    assert not any(p.name.startswith(".again") for p in tmp_path.iterdir())   # no staging folder left behind

    # A pair whose chosen and rejected were swapped after the run no longer matches its judgment.
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    path = broken / "rounds/000000/pairs.jsonl"
    rows = read_jsonl(path)
    rows[0]["chosen"], rows[0]["rejected"] = rows[0]["rejected"], rows[0]["chosen"]
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: does not match any judgment"):
        export_pairs(broken, tmp_path / "e2")
    assert not (tmp_path / "e2").exists()


def test_a_run_that_kept_no_pair_exports_empty_datasets_with_every_column(tmp_path):
    """The export at the end of every run must not fail a run whose judge kept nothing."""
    from oaif.datasets_io import export_pairs

    (tmp_path / "run/rounds").mkdir(parents=True)
    (tmp_path / "run/config.yaml").write_text("name: run\n")
    out = export_pairs(tmp_path / "run", tmp_path / "out")
    preference, kto = (datasets.load_from_disk(str(out / name)) for name in ("preference", "kto"))
    assert len(preference) == len(kto) == 0
    assert preference.column_names == ["prompt", "chosen", "rejected", "p_chosen", "round", "policy_version",
                                       "prompt_id", *PROVENANCE]
    assert kto.column_names == ["prompt", "completion", "label", "round", "policy_version", "prompt_id", *PROVENANCE]


@pytest.mark.parametrize("form", ["preference", "kto"])
def test_trl_trains_a_step_on_the_export(exported, tiny_model, tmp_path, form):
    """TRL's DPOTrainer on the preference form, KTOTrainer on the KTO form (still in TRL's
    top level in 1.16, also in trl.experimental.kto)."""
    import trl

    config, trainer_class = (trl.DPOConfig, trl.DPOTrainer) if form == "preference" else (trl.KTOConfig, trl.KTOTrainer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = config(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=256)
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.load_from_disk(str(exported[1] / form)),
                            processing_class=AutoTokenizer.from_pretrained(tiny_model))
    assert trainer.train().global_step == 1
    [log] = [entry for entry in trainer.state.log_history if "loss" in entry]
    # TRL found the responses in the export's columns: log-probs of real tokens on both sides.
    assert torch.isfinite(torch.tensor(log["loss"])) and log["logps/chosen"] < 0 and log["logps/rejected"] < 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_oaif_offline_reads_the_export_and_trains_on_it(exported, tiny_model, tmp_path):
    run_dir, out = exported
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = [p for d in sorted((run_dir / "rounds").iterdir()) for p in read_jsonl(d / "pairs.jsonl")]
    from_folder, _ = load_pairs(out / "preference", tok, max_prompt_tokens=256)
    assert [(p.prompt_id, p.messages, p.chosen, p.rejected, p.p_chosen) for p in from_folder] == \
        [(p["prompt_id"], p["messages"], p["chosen"], p["rejected"], p["p_chosen"]) for p in pairs]
    assert load_pairs(out / "preference.parquet", tok, max_prompt_tokens=256)[0] == from_folder
    # Responses are re-tokenized (ending in EOS): the run's own token ids, when it stopped by itself.
    stopped = [(a, p) for a, p in zip(from_folder, pairs) if p["chosen_token_ids"][-1] == tok.eos_token_id]
    assert stopped and all(a.chosen_token_ids == p["chosen_token_ids"] for a, p in stopped)

    # TRL's plain-string form too.
    datasets.Dataset.from_list([{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Red, and blue too."}]) \
        .to_parquet(str(tmp_path / "plain.parquet"))
    [plain], _ = load_pairs(tmp_path / "plain.parquet", tok, max_prompt_tokens=256)
    assert (plain.messages, plain.chosen, plain.rejected, plain.p_chosen) == \
        ([{"role": "user", "content": "Name a colour."}], "Red.", "Red, and blue too.", 1.0)

    r = oaif_main("offline", str(out / "preference"), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 f"output_dir={tmp_path}", "name=offline", "rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = read_jsonl(tmp_path / "offline/pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in trained] == [(p["chosen"], p["rejected"]) for p in pairs]
    [m] = read_jsonl(tmp_path / "offline/metrics.jsonl")
    assert m["pairs_kept"] == len(pairs) and m["train/steps"] >= 1


def test_merged_lora_export_in_vllm_generates_what_transformers_generates(tiny_model, tmp_path, closing):
    """`oaif export` of a LoRA run: vLLM serves the merged folder with transformers' greedy
    outputs, and they are the trained policy's, not the base model's."""
    from oaif.config import GenerateConfig
    from oaif.engine.vllm import InProcessEngine, build_llm
    from oaif.generate import Generator

    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=lora",
                 "train.lora.enabled=true", "train.lora.r=8", "train.learning_rate=3e-3", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = tmp_path / "merged"
    r = oaif_main("export", str(tmp_path / "lora/checkpoints/round_000001"), "--out", str(merged))
    assert r.returncode == 0, r.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(merged)
    llm = closing(build_llm(str(merged), "float32", seed=0, kv_cache_gib=0.25, max_model_len=256, enforce_eager=True))
    gen = Generator(InProcessEngine(llm), tokenizer, GenerateConfig(max_new_tokens=48), max_prompt_tokens=128)
    ids = [gen.encode(p) for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:8]]
    served = gen.greedy(ids, 48)
    exported_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    hf = [hf_greedy(exported_model, i, 48, tokenizer.eos_token_id) for i in ids]
    base = [hf_greedy(base_model, i, 48, tokenizer.eos_token_id) for i in ids]
    assert served == hf, "vLLM must generate from the exported folder exactly what transformers generates"
    assert served != base, "the export must hold the trained adapter, not the base weights (else vacuous)"
