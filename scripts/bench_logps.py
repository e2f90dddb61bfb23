"""Benchmark: the trainer's sequence log-probs against a full log-softmax, side by side.

    .venv/bin/python scripts/bench_logps.py      # writes bench/results/logps.json
    .venv/bin/python scripts/bench_logps.py --dtype bfloat16 --out bench/results/logps_bf16.json
    .venv/bin/python scripts/bench_logps.py --dtype bfloat16 --lora --out bench/results/logps_bf16_lora.json

`oaif.train.sequence_logps` asks the model for logits only from the batch's first response
position and takes each token's log-prob as its logit minus the row's logsumexp; the
baseline below is the straightforward version (logits everywhere, a full log-softmax, then
a gather). Both run forward + backward on the same 16 random sequences, alternating; the
medians (first rep dropped as warm-up) and their ratio are reported per model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from oaif.config import TrainConfig
from oaif.train import batch_sequences, lora_model, sequence_logps
from oaif.models import load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
# model folder -> (prompt tokens, response tokens), each drawn between half and all of it.
MODELS = {"bench/models/tiny-h256-l4-s0": (30, 256), "models/smollm2-135m-instruct": (40, 64)}


def full_log_softmax(model, input_ids, attention_mask, loss_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * loss_mask[:, 1:]).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: the passes under bf16 autocast (fp32 weights), as the trainer runs them")
    parser.add_argument("--lora", action="store_true",
                        help="a LoRA adapter (r 16, oaif's default targets) on the base frozen in --dtype, as the trainer builds it")
    parser.add_argument("--out", default=str(ROOT / "bench/results/logps.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for folder, (prompt_len, response_len) in MODELS.items():
        if not (ROOT / folder / "config.json").is_file():
            print(f"skipping {folder}: missing (scripts/bench.py and scripts/demo.sh build it)")
            continue
        model = load_causal_lm(str(ROOT / folder), args.dtype if args.lora else "float32", trainable=not args.lora)
        if args.lora:
            model = lora_model(model, 16, 32, 0.0, TrainConfig().lora.target_modules, "CAUSAL_LM")
        rng, vocab = random.Random(0), model.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(prompt_len // 2, prompt_len))] for _ in range(16)]
        responses = [[rng.randrange(vocab) for _ in range(rng.randrange(response_len // 2, response_len))]
                     for _ in range(16)]
        batch = batch_sequences(prompts, responses, 0)
        times = {"full_log_softmax": [], "oaif": []}
        for _ in range(args.reps):
            for name, fn in (("full_log_softmax", full_log_softmax), ("oaif", sequence_logps)):
                model.zero_grad()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                    logps = fn(model, *batch)
                logps.sum().backward()
                times[name].append(time.perf_counter() - t0)
        base, ours = (statistics.median(times[k][1:]) for k in ("full_log_softmax", "oaif"))
        results[folder] = {"full_log_softmax_s": base, "oaif_s": ours, "ratio": ours / base, "vocab": vocab,
                           "dtype": args.dtype, "lora": args.lora}
        print(f"{folder}, {args.dtype}{', LoRA' if args.lora else ''}: forward + backward of 16 sequences: full log-softmax {base:.3f} s, oaif {ours:.3f} s "
              f"({ours / base:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
