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

import random
import time
from pathlib import Path

from oaif.checkpoint import build_trainer
from oaif.config import RunConfig
from oaif.console import format_row, header
from oaif.datasets_io import load_pairs
from oaif.distributed import check_distributed, end, make_accelerator
from oaif.models import check_model, policy_tokenizer
from oaif.rundir import RunDir, resume_config, run_identity


def run_offline(cfg: RunConfig, pairs_path: str | Path, log=print) -> Path:
    """Train on the pair file for cfg.rounds shuffled passes; returns the run directory."""
    return _train(cfg, pairs_path, RunDir(Path(cfg.output_dir) / cfg.name), log)


def resume_offline(run_dir: Path, overrides: list[str] = (), *, checkpoint: Path | None = None, log=print) -> Path:
    """`oaif resume` of an offline run: the same passes over the pairs it saved, from its
    checkpoint (default: the newest whole one), in the order an uninterrupted run takes."""
    cfg = resume_config(run_dir, overrides)
    return _train(cfg, run_dir / "pairs.jsonl", RunDir(run_dir, resume=True, checkpoint=checkpoint), log)


def _train(cfg: RunConfig, pairs_path: str | Path, run: RunDir, log) -> Path:
    run.accelerator = make_accelerator()
    if not run.main:
        log = lambda *_: None  # noqa: E731 (rank 0 alone prints)
    try:
        check_distributed(cfg, run.accelerator, judge=False)
        check_model(cfg.policy.model, "policy.model")
        tokenizer = run.tokenizer = policy_tokenizer(cfg.policy)
        pairs, skipped = load_pairs(pairs_path, tokenizer, cfg.policy.max_prompt_tokens)  # every rank: same file
        # What was trained on, as tokens (and what a resume reads).
        run.open(cfg, files={} if run.resume else {"pairs.jsonl": pairs})
        run.identity = run_identity(cfg, data=str(run.path / "pairs.jsonl"))
        state = run.rewind(cfg, log) if run.resume else None
        steps = cfg.rounds * cfg.train.epochs_per_round * -(-len(pairs) // cfg.train.batch_size)
        trainer = build_trainer(cfg, tokenizer.pad_token_id, steps, run.accelerator, run.resume_from if state else None)
        log(f"run directory: {run.path}; {len(pairs)} pairs from {pairs_path} (skipped: {skipped})")
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
            run.finish(cfg, index, trainer, metrics, last=index == cfg.rounds - 1)
            log(format_row(metrics))
        log(f"done: {cfg.rounds} passes over {len(pairs)} pairs; checkpoint in {run.path / 'checkpoints'}")
        return run.path
    finally:
        run.close()
        end(run.accelerator)
