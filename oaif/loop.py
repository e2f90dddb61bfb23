"""The OAIF loop: generate → annotate (both orders) → train (online DPO) → sync, per round.

    oaif run configs/tiny_cpu.yaml [key=value ...]

Each round samples from the policy as it is *now* (the engine holds the weights of the
last sync), so the preference data is always on-policy (OAIF, Guo et al. 2024, Alg. 1).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from oaif.annotate.base import Annotator
from oaif.annotate.judge import judge_pairs, judgment_metrics
from oaif.annotate.select import build_annotator, check_inputs
from oaif.checkpoint import save_checkpoint
from oaif.config import RunConfig, dump_config
from oaif.records import Prompt, append_jsonl, load_prompts, write_jsonl

# (metric, column title, format) of the line printed per round.
COLUMNS = [("round", "round", "d"), ("pairs_kept", "kept", "d"), ("pairs_dropped", "dropped", "d"),
           ("generate/mean_length", "mean_len", ".1f"), ("train/loss", "loss", ".4f"),
           ("train/reward_accuracy", "reward_acc", ".2f"), ("round/seconds", "seconds", ".1f")]


def format_row(metrics: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        v = metrics.get(key)
        cells.append(f"{format(v, fmt) if v is not None else '-':>{max(len(title), 6)}}")
    return "  ".join(cells)


def header() -> str:
    return "  ".join(f"{title:>{max(len(title), 6)}}" for _, title, _ in COLUMNS)


class RunDirExists(FileExistsError):
    pass


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists():
        if not cfg.overwrite:
            raise RunDirExists(f"run directory {run_dir} exists: pass name=<new name> or overwrite=true")
        shutil.rmtree(run_dir)
    (run_dir / "rounds").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    return run_dir


def round_prompts(prompts: list[Prompt], per_round: int, seed: int):
    """Endless stream of prompt batches: each pass over the set in a new seeded order."""
    rng, queue = random.Random(seed), []
    while True:
        batch = []
        while len(batch) < per_round:
            if not queue:
                queue = prompts[:]
                rng.shuffle(queue)
            batch.append(queue.pop())
        yield batch


@dataclass
class Loop:
    """Everything a round needs, built once by `setup`."""
    cfg: RunConfig
    run_dir: Path
    generator: "Generator"
    annotator: Annotator
    trainer: "DPOTrainer"
    llm: "vllm.LLM | None"   # None in server mode
    tokenizer: object
    policy_version: int = 0
    annotator_totals: dict | None = None   # annotator.stats at the end of the last round

    def sync(self) -> float:
        """Make the engine sample from the trainer's current policy; returns seconds."""
        from oaif.sync import merged_copy, push_lora_adapter, push_weights

        g, policy = self.cfg.generate, self.trainer.policy
        if g.server_url:
            from oaif.server import push_weights_to_server

            return push_weights_to_server(g.server_url, merged_copy(policy), g.server_weights_dir)
        if self.cfg.train.lora.enabled and self.cfg.train.lora.sync == "vllm_lora":
            t0 = time.perf_counter()
            self.generator.engine.lora_request = push_lora_adapter(policy, self.run_dir / "adapters",
                                                                   self.policy_version)
            return time.perf_counter() - t0
        return push_weights(self.llm, policy)

    def round(self, index: int, prompts: list[Prompt]) -> dict:
        t0 = time.perf_counter()
        out = self.run_dir / "rounds" / f"{index:06d}"
        groups, metrics = self.generator.sample(prompts, index, self.policy_version)
        write_jsonl(out / "samples.jsonl", [s for g in groups for s in g])

        pairs = [(g[k], g[k + 1]) for g in groups for k in range(0, len(g) - 1, 2)]
        judged = judge_pairs(self.annotator, pairs, index, self.policy_version)
        write_jsonl(out / "judgments.jsonl", judged.judgments)
        write_jsonl(out / "pairs.jsonl", judged.pairs)
        metrics |= judgment_metrics(judged.judgments)
        totals, before = dict(self.annotator.stats), self.annotator_totals or {}
        metrics |= {f"annotate/{k}": v - before.get(k, 0) for k, v in totals.items()}  # this round's share
        self.annotator_totals = totals

        if judged.pairs:
            metrics |= self.trainer.train_round(judged.pairs)
            self.policy_version += 1
            metrics["sync/seconds"] = self.sync()
        seconds = time.perf_counter() - t0
        return {"round": index, "policy_version": self.policy_version, "pairs_kept": len(judged.pairs),
                "pairs_dropped": len(pairs) - len(judged.pairs), **metrics,
                "round/seconds": seconds, "round/pairs_per_s": len(judged.pairs) / seconds}


def setup(cfg: RunConfig, run_dir: Path) -> Loop:
    from transformers import AutoTokenizer

    from oaif.engines import build_llm
    from oaif.generate import Generator, InProcessEngine
    from oaif.train import DPOTrainer, build_policy

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    g, lora = cfg.generate, cfg.train.lora
    if g.server_url:
        from oaif.server import ServerEngine

        llm, engine = None, ServerEngine(g.server_url)
    else:
        llm = build_llm(cfg.policy.model, cfg.policy.dtype, cfg.seed, g.kv_cache_gib,
                        cfg.policy.max_prompt_tokens + g.max_new_tokens, g.tensor_parallel_size,
                        g.gpu_memory_utilization,
                        max_lora_rank=lora.r if lora.enabled and lora.sync == "vllm_lora" else 0,
                        enforce_eager=g.enforce_eager)
        engine = InProcessEngine(llm)
    annotator = build_annotator(cfg)
    policy, reference = build_policy(cfg.policy.model, cfg.policy.dtype, cfg.policy.device, cfg.train)
    # The schedule runs over the most optimizer steps the run can take (every pair kept).
    pairs_per_round = cfg.prompts_per_round * (g.samples_per_prompt // 2)
    total_steps = cfg.rounds * cfg.train.epochs_per_round * math.ceil(pairs_per_round / cfg.train.batch_size)
    trainer = DPOTrainer(policy, reference, cfg.train, tokenizer.pad_token_id, total_steps)
    loop = Loop(cfg, run_dir, Generator(engine, tokenizer, g, cfg.policy.max_prompt_tokens), annotator, trainer,
                llm, tokenizer)
    # Round 0 must sample from the policy as it starts: an in-process engine holds the base
    # weights (wrong when starting from an adapter); a server may hold anything (an earlier run's).
    if lora.adapter or g.server_url:
        loop.sync()
    return loop


def run(cfg: RunConfig, log=print) -> Path:
    """Run every round; returns the run directory."""
    # Bad input fails here, before any engine starts or any file is written.
    prompts = load_prompts(cfg.prompts)
    check_inputs(cfg)
    run_dir = prepare_run_dir(cfg)
    loop = setup(cfg, run_dir)
    log(f"run directory: {run_dir}")
    log(header())
    batches = round_prompts(prompts, cfg.prompts_per_round, cfg.seed)
    lengths = []
    for index in range(cfg.rounds):
        metrics = loop.round(index, next(batches))
        last = index == cfg.rounds - 1
        if last or (cfg.train.checkpoint_every and (index + 1) % cfg.train.checkpoint_every == 0):
            save_checkpoint(run_dir, index, loop.policy_version, loop.trainer, loop.tokenizer)
        append_jsonl(run_dir / "metrics.jsonl", metrics)
        log(format_row(metrics))
        lengths.append(metrics["generate/mean_length"])
    log(f"done: {cfg.rounds} rounds, policy version {loop.policy_version}; mean response length "
        f"{lengths[0]:.1f} -> {lengths[-1]:.1f} tokens; records and metrics.jsonl in {run_dir}")
    return run_dir
