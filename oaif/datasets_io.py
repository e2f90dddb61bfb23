"""Hugging Face `datasets` in and out: prompt sets and pair files read from datasets, and a
run's kept pairs exported for TRL.

    oaif export-pairs runs/NAME --out exports/NAME [--overwrite]

In: a `.parquet` or `.csv` file, a folder written by `save_to_disk` (a Dataset or a
DatasetDict), or anything `datasets.load_dataset` takes (a folder of data files, a hub name);
rows come back as plain dicts, as if read from a JSONL file.

Out: every kept pair of the run (rounds/*/pairs.jsonl), with the provenance of the judgment
that kept it (rounds/*/judgments.jsonl), as
  OUT/preference, OUT/preference.parquet   TRL's conversational preference format: prompt
                                           (chat messages), chosen and rejected (one
                                           assistant message each), p_chosen, round,
                                           policy_version, prompt_id, backend, model,
                                           constitution, constitution_hash, template_hash
  OUT/kto, OUT/kto.parquet                 the unpaired (KTO) form: prompt, completion,
                                           label (True: chosen), two rows per pair
The folders load with `datasets.load_from_disk`; `oaif offline OUT/preference` trains on them.
"""

from __future__ import annotations

from pathlib import Path

from oaif import outputs
from oaif.faults import crash_point
from oaif.records import read_jsonl
from oaif.rundir import is_run_dir

# Single data files read through `datasets`; any other file is read as JSONL, as always.
DATA_FILES = {".parquet": "parquet", ".csv": "csv"}
EXPORT_NAMES = {"preference", "preference.parquet", "kto", "kto.parquet"}
EXPORT = "pair export"
PROVENANCE = ("backend", "model", "constitution", "constitution_hash", "template_hash")


def _without_nulls(value):
    """Arrow gives every row every column and every message every key, None where the row
    had none; without them a row reads as the JSON object it was made from."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def dataset_rows(source: str | Path, what: str, split: str = "train",
                 split_fix: str = "") -> tuple[list[dict], list[str]]:
    """(rows, column names) of a dataset: a .parquet/.csv file, a save_to_disk folder, or
    whatever datasets.load_dataset takes. `what` names the setting in errors; `split_fix`
    says how to pick another split."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            data = datasets.load_dataset(DATA_FILES[path.suffix], data_files=str(path))
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))   # written by save_to_disk
        else:
            data = datasets.load_dataset(str(source))    # a folder of data files, or a hub name
    except (OSError, ValueError) as e:   # not found, hub unreachable, files datasets cannot read
        raise ValueError(f"{what}: cannot load {source} as a dataset ({type(e).__name__}: {e}); give a JSONL, "
                         f"parquet or CSV file, a save_to_disk folder or a folder of data files") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{what}: split '{split}' not in {source} (splits: {', '.join(data)}); {split_fix}")
        data = data[split]
    return [_without_nulls(row) for row in data.to_list()], list(data.column_names)


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _chat(messages: list[dict]) -> list[dict]:
    # TRL's conversational columns are role/content lists; one schema for every row.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def run_pairs(run_dir: Path) -> list[tuple[dict, dict]]:
    """(pair record, its judgment record) for every kept pair of the run, in round order."""
    out = []
    for round_dir in sorted(p for p in (run_dir / "rounds").iterdir() if (p / "pairs.jsonl").is_file()):
        texts: dict[tuple[str, int], set[str]] = {}   # a prompt may be drawn twice in a round
        for s in read_jsonl(round_dir / "samples.jsonl"):
            texts.setdefault((s["prompt_id"], s["index"]), set()).add(s["text"])
        # Each kept pair came from an agreeing judgment (every one of them, or with annotate.pairs
        # best_worst one per prompt): found by prompt and texts, each judgment used once, which
        # also checks that the round's three files still line up.
        by_prompt: dict[str, list[dict]] = {}
        for j in read_jsonl(round_dir / "judgments.jsonl"):
            if j["verdict"] in ("a", "b"):
                by_prompt.setdefault(j["prompt_id"], []).append(j)
        for n, pair in enumerate(read_jsonl(round_dir / "pairs.jsonl"), 1):
            def matches(j: dict) -> bool:
                chosen, rejected = (j["a"], j["b"]) if j["verdict"] == "a" else (j["b"], j["a"])
                return (j["round"] == pair["round"] and pair["chosen"] in texts.get((j["prompt_id"], chosen), ())
                        and pair["rejected"] in texts.get((j["prompt_id"], rejected), ()))
            candidates = by_prompt.get(pair["prompt_id"], [])
            k = next((k for k, j in enumerate(candidates) if matches(j)), None)
            if k is None:
                raise ValueError(f"{round_dir / 'pairs.jsonl'}:{n}: does not match any judgment with verdict a or b "
                                 f"in judgments.jsonl (prompt {pair['prompt_id']}, its chosen and rejected texts in "
                                 f"samples.jsonl); the round's records were changed after the run")
            out.append((pair, candidates.pop(k)))   # each judgment gives one pair
    return out


def export_pairs(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run's kept pairs as TRL preference and KTO datasets (module docstring) into
    `out`, whole: built beside it, then renamed (oaif/outputs.py: a new folder, or with
    overwrite an earlier export). Returns `out`."""
    import datasets
    from datasets import Features, List, Value

    run_dir, out = Path(run_dir), Path(out)
    if not is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not an oaif run directory (no config.yaml and rounds/); give runs/NAME")
    # The run's own dataset/ (the loop's export at the end of every run) may be one written
    # before outputs carried a marker: known by its names alone.
    legacy = EXPORT_NAMES if out.absolute() == (run_dir / "dataset").absolute() else ()
    outputs.check(out, EXPORT, folder=True, overwrite=overwrite, legacy=legacy)

    chat = List({"role": Value("string"), "content": Value("string")})
    common = {"round": Value("int64"), "policy_version": Value("int64"), "prompt_id": Value("string"),
              **{k: Value("string") for k in PROVENANCE}}
    preference, kto = [], []
    for pair, judgment in run_pairs(run_dir):
        shared = {"round": pair["round"], "policy_version": pair["policy_version"], "prompt_id": pair["prompt_id"],
                  **{k: judgment[k] for k in PROVENANCE}}
        prompt = _chat(pair["messages"])
        preference.append({"prompt": prompt, "chosen": _assistant(pair["chosen"]),
                           "rejected": _assistant(pair["rejected"]), "p_chosen": pair["p_chosen"], **shared})
        kto += [{"prompt": prompt, "completion": _assistant(pair["chosen"]), "label": True, **shared},
                {"prompt": prompt, "completion": _assistant(pair["rejected"]), "label": False, **shared}]
    # Explicit features, filled column by column: the same columns and types for every run,
    # one that kept no pair included.
    tables = {}
    for name, rows, features in [
            ("preference", preference, Features({"prompt": chat, "chosen": chat, "rejected": chat,
                                                 "p_chosen": Value("float64"), **common})),
            ("kto", kto, Features({"prompt": chat, "completion": chat, "label": Value("bool"), **common}))]:
        tables[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)

    def fill(staging: Path) -> None:
        for name, table in tables.items():
            table.save_to_disk(str(staging / name), num_shards=1)   # an empty table gets no shard by default
            table.to_parquet(str(staging / f"{name}.parquet"))
            crash_point("export")

    return outputs.write_folder(out, EXPORT, fill, overwrite=overwrite, legacy=legacy)

