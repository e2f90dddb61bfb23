"""The loop from a script: what `oaif run CONFIG key=value ...` does, in three lines.

    python examples/basic_run.py configs/tiny_cpu.yaml rounds=4 name=basic
"""

import sys

import oaif

cfg = oaif.load_config(sys.argv[1], sys.argv[2:])   # the same validation and errors as the CLI
run_dir = oaif.run(cfg)
print(f"records in {run_dir}")
