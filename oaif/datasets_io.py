"""Datasets in and out: prompt sets (`load_prompts`) and pair files (`load_pairs`) read from
JSONL or Hugging Face `datasets`, and a run's kept pairs exported for TRL.

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

import dataclasses
import re
from pathlib import Path

from oaif import outputs
from oaif.bundled import data_path
from oaif.faults import crash_point
from oaif.generate import encode_prompt
from oaif.records import PreferencePair, Prompt, is_chat, prompts_from_rows, read_jsonl
from oaif.rundir import is_run_dir

# Single data files read through `datasets`; any other file is read as JSONL, as always.
DATA_FILES = {".parquet": "parquet", ".csv": "csv"}
EXPORT_NAMES = {"preference", "preference.parquet", "kto", "kto.parquet"}
EXPORT = "pair export"
PROVENANCE = ("backend", "model", "constitution", "constitution_hash", "template_hash")


def load_prompts(path: str | Path, key: str = "run.prompts", column: str = "", split: str = "train") -> list[Prompt]:
    """Prompt set: JSONL lines of {"messages": [...]} or {"prompt": "text"}, optional "id" and
    "references" (accepted answers, for the `matches_reference` rule); or a dataset with such
    columns (a .parquet or .csv file, a save_to_disk folder, a load_dataset folder or hub
    name), its `split`. column: the one holding the prompt, text or chat messages (empty:
    'messages' if there is one, else 'prompt')."""
    setting = key.removeprefix("run.")   # the config key (messages call the prompt set run.prompts)
    source = path = data_path(path)
    if source.is_file() and source.suffix not in DATA_FILES:
        rows, where = read_jsonl(source), lambda n: f"{source}:{n}"
        if column:
            rows = [_prompt_column(row, column, where(n), setting) for n, row in enumerate(rows, 1)]
    elif source.exists() or _hub_name(str(path)):
        rows, columns = dataset_rows(path, setting, split, f"set {setting}_split")
        where = lambda n: f"{path} row {n}"  # noqa: E731
        if not ({column} if column else {"messages", "prompt"}) & set(columns):
            wanted = f"column '{column}'" if column else "'messages' or 'prompt' column"
            raise ValueError(f"{setting}: no {wanted} in {path} (columns: {', '.join(columns)}); set "
                             f"{setting}_column to the column holding the prompt (text or chat messages)")
        # Through the column even by default: a TRL 'prompt' column may hold chat messages.
        rows = [_prompt_column(row, column or ("messages" if "messages" in row else "prompt"), where(n), setting)
                for n, row in enumerate(rows, 1)]
    else:
        raise FileNotFoundError(f"prompt file {path} not found ({key})")
    prompts = prompts_from_rows(rows, where)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _hub_name(text: str) -> bool:
    """'name' or 'owner/name', worth asking load_dataset; a missing prompts/x.jsonl or ./data
    is a local typo, answered at once instead of after the hub's retries."""
    local = Path(text).suffix in (".jsonl", ".json", ".parquet", ".csv")
    return not local and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None


def _prompt_column(row: dict, column: str, where: str, setting: str) -> dict:
    """A row whose prompt is in `column`, as the {"prompt"} or {"messages"} row of a prompt file."""
    if not isinstance(row, dict) or column not in row:
        raise ValueError(f"{where}: no '{column}' (the prompt's key, from {setting}_column)")
    value = row[column]
    if not isinstance(value, (str, list)):
        raise ValueError(f"{where}: '{column}' must be a string or a list of chat messages ({setting}_column)")
    kept = {k: row[k] for k in ("id", "references") if k in row}
    return {**kept, "prompt" if isinstance(value, str) else "messages": value}


PAIR_FIELDS = [f.name for f in dataclasses.fields(PreferencePair)]


def row_messages(row: dict, where: str) -> list[dict]:
    """A data row's prompt as chat messages ('messages', or 'prompt': a string or messages)."""
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if is_chat(prompt):
        return prompt
    raise ValueError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def row_response(value):
    """A response: a string, or TRL's conversational form, one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        return value[0].get("content")
    return value


def load_pairs(path: str | Path, tokenizer, max_prompt_tokens: int) -> tuple[list[PreferencePair], dict]:
    """(pairs, counts of skipped rows by reason); a malformed row is an error naming its line."""
    path = Path(path)
    if path.is_file() and path.suffix not in DATA_FILES:
        rows, where_row = read_jsonl(path), lambda n: f"{path}:{n}"
    elif path.exists():
        rows, _ = dataset_rows(path, "oaif offline", "train", "give that split's own folder or file")
        where_row = lambda n: f"{path} row {n}"  # noqa: E731
    else:
        raise FileNotFoundError(f"pair file {path} not found")
    pairs, skipped = [], {"no_preference": 0, "prompt_too_long": 0}
    for n, row in enumerate(rows, 1):
        where = where_row(n)
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        if "chosen_token_ids" in row:   # oaif's own record: exact token ids
            missing = [k for k in PAIR_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: an oaif pair record needs {', '.join(missing)}")
            pairs.append(PreferencePair(**{k: row[k] for k in PAIR_FIELDS}))
            continue
        if "verdict" in row:            # `oaif annotate` output
            if row["verdict"] not in ("a", "b"):
                skipped["no_preference"] += 1
                continue
            first = row["verdict"] == "a"
            chosen, rejected = (row.get("a"), row.get("b")) if first else (row.get("b"), row.get("a"))
            p_chosen = row.get("p_a") if first else 1 - row.get("p_a", 0.0)
        else:
            chosen, rejected = row_response(row.get("chosen")), row_response(row.get("rejected"))
            p_chosen = row.get("p_chosen", 1.0)
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError(f"{where}: expected 'chosen' and 'rejected' strings (or one assistant message each), "
                             f"an oaif pair record, or `oaif annotate` output (a, b, verdict)")
        if not isinstance(p_chosen, (int, float)) or not 0 <= p_chosen <= 1:
            raise ValueError(f"{where}: 'p_chosen' must be a probability in [0, 1], got {p_chosen!r}")
        messages = row_messages(row, where)
        prompt_ids = encode_prompt(tokenizer, messages)
        if len(prompt_ids) > max_prompt_tokens:
            skipped["prompt_too_long"] += 1
            continue
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in (chosen, rejected)]
        pairs.append(PreferencePair(
            round=0, policy_version=0, prompt_id=str(row.get("id", row.get("prompt_id", n - 1))), messages=messages,
            chosen=chosen, rejected=rejected, p_chosen=float(p_chosen), prompt_token_ids=prompt_ids,
            chosen_token_ids=ids[0], rejected_token_ids=ids[1]))
    if not pairs:
        raise ValueError(f"{path}: no usable pairs (skipped: {skipped})")
    return pairs, skipped


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

