"""TRL's online DPO loop, timed: the TRL side of scripts/bench.py (which starts it).

    .venv/bin/python scripts/bench_trl_runner.py SETTINGS.json OUT.json

Builds `trl.experimental.online_dpo.OnlineDPOTrainer` (generation with HF `generate`, no
vLLM) on the settings bench.py wrote, trains `steps` steps and writes to OUT.json:
  loop_seconds       first step's start to last step's end (a TrainerCallback), the span
                     oaif's `round/seconds` add up to
  step_seconds       each step's duration
  generate_seconds   time in the trainer's `_generate` (sampling both completions)
  reward_seconds     time in its reward functions (the judge's stage)
  tokens             completion tokens generated (EOS included, padding not), as vLLM counts them
  ties               pairs the reward calls equal (oaif drops them; TRL trains on them)
  sequences          (prompt tokens, completion tokens) of every sequence trained on, padding
                     not counted: bench.py's training FLOP estimate
  mixed_precision    the precision TRL's accelerator trained in ("no" or "bf16")
TRL stays a benchmark-only dependency: this file is the only place that imports it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def concise_reward(completions, **kwargs) -> list[float]:
    """oaif's `shorter` rule (constitutions/concise.yaml) as a reward: fewer characters of
    the decoded response score higher. oaif compares len(text) of the response with special
    tokens skipped; TRL decodes its completions the same way (skip_special_tokens=True)."""
    return [-float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def main() -> None:
    settings_path, out_path = sys.argv[1], Path(sys.argv[2])
    s = json.loads(Path(settings_path).read_text())
    torch.set_num_threads(s["threads"])

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    prompts = [json.loads(line)["messages"] for line in Path(s["prompts"]).read_text().splitlines()]
    peft_config = None
    if s["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s["lora"]["r"], lora_alpha=s["lora"]["alpha"], lora_dropout=0.0,
                                 target_modules=s["lora"]["target_modules"], task_type="CAUSAL_LM")
    args = OnlineDPOConfig(
        output_dir=s["output_dir"], seed=s["seed"], max_steps=s["steps"],
        per_device_train_batch_size=s["prompts_per_step"], gradient_accumulation_steps=1,
        max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], beta=s["beta"],
        learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, loss_type="sigmoid", use_vllm=False,
        # bench.py's dtype, as oaif runs it: fp32 weights (the model is loaded in fp32) with the
        # forward passes under bf16 autocast, or fp32 throughout. transformers refuses bf16
        # without a GPU unless told the run is on the CPU.
        bf16=s["dtype"] == "bfloat16", fp16=False, use_cpu=not torch.cuda.is_available(),
        # TRL turns it on by default, and with it HF generate runs without a KV cache; oaif
        # checkpoints no activations either.
        gradient_checkpointing=False,
        # One checkpoint after the last step (weights, optimizer, scheduler), as oaif writes one
        # after its last round; written after on_step_end, so outside the timed loop in both.
        save_strategy="steps", save_steps=s["steps"],
        logging_steps=1, report_to="none", disable_tqdm=True,
    )
    trainer = OnlineDPOTrainer(model=model, reward_funcs=concise_reward, args=args,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                               processing_class=tokenizer, peft_config=peft_config)
    times = StepTimes()
    trainer.add_callback(times)

    # The trainer's own stages, timed by wrapping its methods (instance attributes shadow them).
    counts = {"generate_seconds": 0.0, "reward_seconds": 0.0, "tokens": 0, "ties": 0, "sequences": []}
    generate, rewards = trainer._generate, trainer._calculate_rewards_from_functions

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        counts["generate_seconds"] += time.perf_counter() - t0
        counts["tokens"] += int(out[3].sum())   # completion_mask: tokens up to and including EOS
        # Every sampled sequence is trained on (both completions of a prompt form its pair).
        counts["sequences"] += list(zip(out[1].sum(-1).tolist(), out[3].sum(-1).tolist()))   # prompt_mask
        return out

    def timed_rewards(prompts, completions, completion_ids_list, **kw):
        t0 = time.perf_counter()
        out = rewards(prompts, completions, completion_ids_list, **kw)
        counts["reward_seconds"] += time.perf_counter() - t0
        half = len(out) // 2   # completions come as [p0c0 .. pNc0, p0c1 .. pNc1]
        counts["ties"] += int((out[:half] == out[half:]).sum())
        return out

    trainer._generate, trainer._calculate_rewards_from_functions = timed_generate, timed_rewards
    trainer.train()

    out_path.write_text(json.dumps({
        "loop_seconds": times.ends[-1] - times.starts[0],
        "step_seconds": [e - b for b, e in zip(times.starts, times.ends)],
        "steps": len(times.ends), "pairs": len(times.ends) * s["prompts_per_step"],
        "torch_threads": torch.get_num_threads(), "mixed_precision": trainer.accelerator.mixed_precision, **counts,
    }, indent=1))


if __name__ == "__main__":
    main()
