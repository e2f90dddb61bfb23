"""Round by round: change what "better" means half-way through a run, by editing the
constitution file the running loop judges with, and stop early if answers collapse.

    python examples/constitution_curriculum.py configs/tiny_cpu.yaml rounds=8 name=curriculum

The loop judges with a working copy of constitutions/detailed.yaml (longer wins, up to 300
characters; annotate.constitution) and re-reads it every round
(annotate.reload_constitution). Half-way, the script writes constitutions/concise.yaml over
it: from the next round on every judgment records the new constitution's hash and the kept
pairs point the other way (the shorter response chosen). The policy turns more slowly than
its data: on the tiny policy the mean length rose 28 -> 38 tokens in the first four rounds,
went on rising for one round after the switch, then fell. Editing the file by hand during
`oaif run ... annotate.reload_constitution=true` does the same.
"""

import shutil
import sys
from pathlib import Path

import oaif

cfg = oaif.load_config(sys.argv[1], sys.argv[2:])
working = Path(cfg.output_dir) / f"{cfg.name}.constitution.yaml"
working.parent.mkdir(parents=True, exist_ok=True)
shutil.copy("constitutions/detailed.yaml", working)
cfg = oaif.load_config(sys.argv[1], [*sys.argv[2:], f"annotate.constitution={working}",
                                     "annotate.reload_constitution=true"])

with oaif.Loop(cfg) as loop:
    for metrics in loop.rounds():
        if metrics["round"] == cfg.rounds // 2 - 1:
            shutil.copy("constitutions/concise.yaml", working)   # judged with from the next round
        if metrics["generate/mean_length"] is not None and metrics["generate/mean_length"] < 2:
            print("answers collapsed to nothing: stopping (the round is checkpointed)")
            break
print(f"records in {loop.run_dir}")
