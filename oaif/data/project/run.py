"""The loop from Python, judged by a function of yours:

    python run.py [key=value ...]        e.g. policy.model=/path/to/model rounds=4
"""

import sys
from pathlib import Path

import oaif


def shorter_is_better(prompt_messages, response_1, response_2):
    """Your judge: the probability that response_1 is the better one (None: no opinion).
    oaif asks it in both orders and keeps the pairs on which both answers agree."""
    if len(response_1) == len(response_2):
        return 0.5
    return 1.0 if len(response_1) < len(response_2) else 0.0


if __name__ == "__main__":
    cfg = oaif.load_config(Path(__file__).parent / "config.yaml", sys.argv[1:])
    run_dir = oaif.run(cfg, annotator=shorter_is_better)
    print(f"records, metrics and checkpoints in {run_dir}")
