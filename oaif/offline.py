"""`oaif offline`: the same trainer on a fixed file of preference pairs, with no generation.

    oaif offline PAIRS CONFIG [key=value ...]

The baseline the OAIF paper sets against online feedback: pairs sampled and judged once,
then trained on, while the policy drifts away from the policy that produced them. PAIRS may
be any of
  - oaif's own pair records (runs/NAME/rounds/000000/pairs.jsonl: round 0 of a run, sampled
    from the starting policy), whose exact token ids are used as they are;
  - `oaif annotate` output: rows with verdict 'a' or 'b' become pairs, others are skipped;
  - {"prompt": text or chat messages, "chosen": ..., "rejected": ...} rows (TRL's format),
    optional "p_chosen"; responses are tokenized and end with EOS. Such rows may also come
    as a dataset: a .parquet file or a save_to_disk folder (`oaif export-pairs` writes both),
    chosen and rejected as strings or as one assistant message each (TRL's conversational form).
A round is one shuffled pass over the file (rounds=N: N epochs; train.epochs_per_round
repeats each). It writes the same run directory as `oaif run`, without per-round samples.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from oaif.config import RunConfig
from oaif.generate import encode_prompt
from oaif.records import PreferencePair, read_jsonl, write_jsonl

PAIR_FIELDS = [f.name for f in dataclasses.fields(PreferencePair)]


def row_messages(row: dict, where: str) -> list[dict]:
    """A data row's prompt as chat messages ('messages', or 'prompt': a string or messages)."""
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
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
    from oaif.datasets_io import DATA_FILES, dataset_rows

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


def run_offline(cfg: RunConfig, pairs_path: str | Path, log=print) -> Path:
    """Train on the pair file for cfg.rounds shuffled passes; returns the run directory."""
    return _with_accelerator(log, lambda accelerator, log: _run_offline(cfg, pairs_path, accelerator, log))


def resume_offline(run_dir: Path, overrides: list[str] = (), *, checkpoint: Path | None = None, log=print) -> Path:
    """`oaif resume` of an offline run: the same passes over the pairs it saved, from its
    checkpoint (default: the newest whole one), in the order an uninterrupted run takes."""
    from oaif.rundir import resume_config

    cfg = resume_config(run_dir, overrides)
    return _with_accelerator(log, lambda accelerator, log: _run_offline(
        cfg, run_dir / "pairs.jsonl", accelerator, log, resume_dir=run_dir, checkpoint=checkpoint))


def _with_accelerator(log, run):
    from oaif.distributed import end, make_accelerator

    accelerator = make_accelerator()
    try:
        return run(accelerator, log if accelerator is None or accelerator.is_main_process else (lambda *_: None))
    finally:
        end(accelerator)


def _run_offline(cfg: RunConfig, pairs_path: str | Path, accelerator, log, resume_dir: Path | None = None,
                 checkpoint: Path | None = None) -> Path:
    from oaif.distributed import check_distributed, on_main
    from oaif.generate import check_model, load_tokenizer
    from oaif.console import format_row, header
    from oaif.loop import build_trainer
    from oaif.rundir import RunLock, finish_round, prepare_run_dir, run_identity, start_resume

    check_distributed(cfg, accelerator, judge=False)
    check_model(cfg.policy.model, "policy.model")
    tokenizer = load_tokenizer(cfg.policy.model)
    pairs, skipped = load_pairs(pairs_path, tokenizer, cfg.policy.max_prompt_tokens)  # every rank: same file
    lock, state = None, None

    def prepare() -> Path:
        nonlocal lock
        if resume_dir is not None:
            lock = RunLock(resume_dir)
            return resume_dir
        run_dir, lock = prepare_run_dir(cfg)
        write_jsonl(run_dir / "pairs.jsonl", pairs)   # what was trained on, as tokens (and what a resume reads)
        return run_dir

    try:
        run_dir = on_main(accelerator, prepare)
        identity = run_identity(cfg, data=str(run_dir / "pairs.jsonl"))
        if resume_dir is not None:
            checkpoint, state = start_resume(cfg, run_dir, checkpoint, identity, accelerator, log)
        steps = cfg.rounds * cfg.train.epochs_per_round * -(-len(pairs) // cfg.train.batch_size)
        trainer = build_trainer(cfg, tokenizer.pad_token_id, steps, accelerator, checkpoint if state else None)
        log(f"run directory: {run_dir}; {len(pairs)} pairs from {pairs_path} (skipped: {skipped})")
        log(header())
        rng = random.Random(cfg.seed)
        first = state["round"] + 1 if state else 0
        for index in range(cfg.rounds):
            t0 = time.perf_counter()
            order = pairs[:]
            rng.shuffle(order)   # every pass, done ones too: a resumed run takes the same orders
            if index < first:
                continue
            metrics = {"round": index, "policy_version": index + 1, "pairs_kept": len(pairs),
                       **trainer.train_round(order)}
            metrics["round/seconds"] = time.perf_counter() - t0
            finish_round(cfg, run_dir, trainer, tokenizer, accelerator, index, index + 1, metrics,
                         last=index == cfg.rounds - 1, extra=lambda: {"identity": identity})
            log(format_row(metrics))
        log(f"done: {cfg.rounds} passes over {len(pairs)} pairs; checkpoint in {run_dir / 'checkpoints'}")
        return run_dir
    finally:
        if lock is not None:
            lock.release()
