"""The `oaif` command.

    oaif init DIR [--overwrite]             a project folder of your own (config, constitution, prompts, script)
    oaif constitutions                      the bundled constitutions, by name
    oaif init-tiny DIR [--overwrite]        build the embedded tiny policy
    oaif export CHECKPOINT --out DIR [--overwrite]
                                            a checkpoint as a plain HF model (LoRA merged)
    oaif export-pairs RUN_DIR --out DIR [--overwrite]
                                            a run's kept pairs as TRL preference and KTO datasets
    oaif run CONFIG [key=value ...]         run the loop
    oaif resume RUN_DIR [key=value ...]     continue a run from its latest checkpoint
    oaif offline PAIRS CONFIG [key=value ...]
                                            train on a fixed pair file (the offline baseline)
    oaif train-rm PAIRS CONFIG [key=value ...] --out DIR
                                            train a reward model on pairs (annotate.backend reward_model)
    oaif sft DATA CONFIG [key=value ...] --out DIR
                                            supervised fine-tuning: a warm start for the loop
    oaif best-of-n CONFIG [key=value ...] --out FILE
                                            the best of n sampled responses per prompt, by the annotator
    oaif critique CONFIG [key=value ...] --out DIR [--overwrite]
                                            Constitutional AI's critique and revision: SFT rows and pairs
    oaif annotate IN --out OUT CONFIG [key=value ...]
                                            judge pairs from a file with CONFIG's annotator
    oaif eval CONFIG [key=value ...] [--out FILE]
                                            the policy against its start on held-out prompts
    oaif convert-gguf FILE --out DIR        a GGUF model (llama.cpp, Ollama) as an HF folder
    oaif report RUN_DIR [--out DIR [--overwrite]] [--pairs N]
                                            plots and one HTML page of a run (default RUN_DIR/report)
    oaif config-help                        every config key, its default and meaning

Every output (--out, init-tiny's DIR) is created new; --overwrite replaces only an earlier
one that oaif wrote (oaif/outputs.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from oaif import resume, run
from oaif.annotate.files import annotate_file
from oaif.bundled import bundled
from oaif.checkpoint import export_merged
from oaif.collector import owned_process
from oaif.config import ConfigError, RunStopped, describe, load_config
from oaif.console import STOPPED_AT_ONCE, StoppedAtOnce
from oaif.datasets_io import export_pairs
from oaif.evaluation import run_eval
from oaif.pipeline.best_of_n import best_of_n
from oaif.pipeline.critique import run_critique
from oaif.pipeline.gguf import convert_gguf
from oaif.pipeline.offline import run_offline
from oaif.pipeline.project import init_project
from oaif.pipeline.report import write_report
from oaif.pipeline.sft import run_sft
from oaif.pipeline.tiny import init_tiny
from oaif.pipeline.train_rm import train_reward_model
from oaif.scratch import private_tempdir


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an earlier {what} that oaif wrote there (never anything else)")


def init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the project folder to create (missing parent folders are made)")
    add_overwrite(p, "project")


def init_command(args: argparse.Namespace) -> None:
    out = init_project(args.out, overwrite=args.overwrite)
    print(f"project: {out}; run it with: cd {out} && oaif run config.yaml policy.model=YOUR_MODEL")


def constitutions_arguments(p: argparse.ArgumentParser) -> None:
    pass


def constitutions_command(args: argparse.Namespace) -> None:
    for path in bundled("constitutions"):
        print(f"{path.stem:<16} {yaml.safe_load(path.read_text()).get('description', '')}")


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.beta=0.2 annotate.backend=vllm")


def run_command(args: argparse.Namespace) -> None:
    run(load_config(args.config, args.overrides))


def resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="runs/NAME")
    p.add_argument("overrides", nargs="*", help="key=value on the run's saved config, e.g. rounds=20")
    p.add_argument("--checkpoint", help="runs/NAME/checkpoints/round_XXXXXX (default: the latest); "
                                        "anything recorded after it is dropped and redone")


def resume_command(args: argparse.Namespace) -> None:
    resume(args.run_dir, args.overrides, checkpoint=args.checkpoint)   # a loop's run, or `oaif offline`'s


def offline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", help="JSONL: oaif pair records, `oaif annotate` output, or prompt/chosen/rejected rows; "
                                 "or such rows as a .parquet file or save_to_disk folder (oaif export-pairs)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for `oaif run`")


def offline_command(args: argparse.Namespace) -> None:
    run_offline(load_config(args.config, args.overrides), args.pairs)


def train_rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", help="a pair file in any format `oaif offline` reads, or a run directory (runs/NAME)")
    p.add_argument("config", help="a config; reward_model.* keys say how to train")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. reward_model.epochs=3")
    p.add_argument("--out", required=True, help="the folder to create: the model (HF format) and metrics.json")
    add_overwrite(p, "model")


def train_rm_command(args: argparse.Namespace) -> None:
    train_reward_model(load_config(args.config, args.overrides), args.pairs, args.out, overwrite=args.overwrite)


def sft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="JSONL, .parquet, .csv or a dataset folder: rows of 'messages' (ending with the "
                                "assistant's turn) or 'prompt' and 'completion' (or 'response')")
    p.add_argument("config", help="a config; sft.* keys say how to train, policy.model what, train.lora.* for LoRA")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. sft.epochs=1 train.lora.enabled=true")
    p.add_argument("--out", required=True, help="the folder to create: the model (HF format) and sft_metrics.jsonl")
    add_overwrite(p, "model")


def sft_command(args: argparse.Namespace) -> None:
    run_sft(load_config(args.config, args.overrides), args.data, args.out, overwrite=args.overwrite)


def best_of_n_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a config: prompts, policy.model, generate.samples_per_prompt (n), annotate.*")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. generate.samples_per_prompt=8 annotate.ranking=knockout")
    p.add_argument("--out", required=True, help="JSONL to write: one row per prompt (prompt, completion, ranking)")
    add_overwrite(p, "best-of-n output")


def best_of_n_command(args: argparse.Namespace) -> None:
    best_of_n(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite)


def critique_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a config: prompts, policy.model, critique.*, the constitution's principles")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. critique.revisions=2 critique.critic=vllm")
    p.add_argument("--out", required=True, help="the folder to create: records.jsonl, sft.jsonl, pairs.jsonl, "
                                                "summary.json")
    add_overwrite(p, "critique output")


def critique_command(args: argparse.Namespace) -> None:
    run_critique(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite)


def annotate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="JSONL lines with prompt (string or chat messages), a, b")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for `oaif run`")
    p.add_argument("--out", required=True, help="output JSONL to create (written whole)")
    add_overwrite(p, "annotate output")


def annotate_command(args: argparse.Namespace) -> None:
    annotate_file(load_config(args.config, args.overrides), args.input, args.out, overwrite=args.overwrite)


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a config (or a run's config.yaml); eval.* keys say what is compared and how")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. eval.policy=runs/NAME/checkpoints/round_000007")
    p.add_argument("--out", help="comparisons JSONL (default: <run>/evals/round_XXXXXX.jsonl for a run's checkpoint)")
    add_overwrite(p, "eval output (--out and its .summary.jsonl)")


def eval_command(args: argparse.Namespace) -> None:
    run_eval(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite)


def convert_gguf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="the folder to create")
    add_overwrite(p, "model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def convert_gguf_command(args: argparse.Namespace) -> None:
    print(f"converted {args.gguf} -> {convert_gguf(args.gguf, args.out, args.dtype, args.overwrite)}")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="runs/NAME/checkpoints/round_XXXXXX")
    p.add_argument("--out", required=True, help="the folder to create")
    add_overwrite(p, "model")


def export_command(args: argparse.Namespace) -> None:
    checkpoint = Path(args.checkpoint)
    cfg = load_config(checkpoint.parent.parent / "config.yaml")  # the run's resolved config
    out = export_merged(checkpoint, Path(args.out), cfg.policy.model, cfg.policy.dtype, args.overwrite)
    print(f"exported {out}")


def export_pairs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="runs/NAME")
    p.add_argument("--out", required=True, help="the folder to create: preference/, kto/ (save_to_disk) and .parquet")
    add_overwrite(p, "pair export")


def export_pairs_command(args: argparse.Namespace) -> None:
    out = export_pairs(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"exported the pairs of {args.run_dir} -> {out}/preference (+ .parquet), {out}/kto (+ .parquet)")


def init_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the folder to create (missing parent folders are made)")
    add_overwrite(p, "model")
    p.add_argument("--steps", type=int, default=300, help="warm-up steps on prompts/tiny_sft.jsonl")
    p.add_argument("--seed", type=int, default=0)


def init_tiny_command(args: argparse.Namespace) -> None:
    init_tiny(args.out, steps=args.steps, seed=args.seed, overwrite=args.overwrite)


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="runs/NAME (finished or still running)")
    p.add_argument("--out", help="folder to create (default: RUN_DIR/report, the run's own: replaced whole)")
    add_overwrite(p, "report")
    p.add_argument("--pairs", type=int, default=4, help="sample pairs shown per round")


def report_command(args: argparse.Namespace) -> None:
    print(f"report: {write_report(args.run_dir, args.out, args.pairs, args.overwrite)}")


def config_help_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="as the README's reference table")


def config_help_command(args: argparse.Namespace) -> None:
    if args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
    for key, default, help in describe():
        print(f"| `{key}` | `{default}` | {help} |" if args.markdown else f"{key} (default: {default or 'empty'})\n    {help}")


@dataclass(frozen=True)
class Command:
    """One subcommand, `oaif NAME ...`."""
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]   # returns on success (exit 0); raises on a failure
    # False: it loads no model and starts no engine, so it skips their set-up (config-help).
    loads_models: bool = True


# In the order `oaif --help` lists them.
COMMANDS = (
    Command("init", "a project folder of your own: a config for your model, a constitution, prompts, a script",
            init_arguments, init_command, loads_models=False),
    Command("run", "run the loop from a YAML config", run_arguments, run_command),
    Command("resume", "continue a run from its latest (or a chosen) checkpoint", resume_arguments, resume_command),
    Command("offline", "train on a fixed file of preference pairs (no generation)", offline_arguments,
            offline_command),
    Command("train-rm", "train a Bradley-Terry reward model on preference pairs", train_rm_arguments,
            train_rm_command),
    Command("sft", "supervised fine-tuning on prompt/response rows (a warm start for the loop)", sft_arguments,
            sft_command),
    Command("best-of-n", "sample n responses per prompt and keep the one the annotator ranks best",
            best_of_n_arguments, best_of_n_command),
    Command("critique", "answer, critique against a principle, revise (Constitutional AI's supervised stage): "
                        "SFT rows and revision-over-original pairs", critique_arguments, critique_command),
    Command("annotate", "judge pairs from a JSONL file with a config's annotator", annotate_arguments,
            annotate_command),
    Command("eval", "win rate of a policy against its starting policy on held-out prompts", eval_arguments,
            eval_command),
    Command("convert-gguf", "a GGUF causal LM as a Hugging Face folder (weights, tokenizer, chat template)",
            convert_gguf_arguments, convert_gguf_command),
    Command("export", "write a checkpoint as a plain Hugging Face model (a LoRA adapter merged in)",
            export_arguments, export_command),
    Command("export-pairs", "a run's kept pairs as datasets in TRL's preference and KTO formats",
            export_pairs_arguments, export_pairs_command),
    Command("init-tiny", "build the tiny local policy (no hub needed)", init_tiny_arguments, init_tiny_command),
    Command("report", "plots and a self-contained HTML page from a run directory", report_arguments, report_command),
    Command("constitutions", "list the bundled constitutions (annotate.constitution: NAME)", constitutions_arguments,
            constitutions_command, loads_models=False),
    Command("config-help", "list every config key", config_help_arguments, config_help_command, loads_models=False),
)


def parser() -> argparse.ArgumentParser:
    """The `oaif` command line, built from the table."""
    top = argparse.ArgumentParser(prog="oaif", description="Online AI feedback: align a policy with an LLM judge.")
    sub = top.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        c.add_arguments(sub.add_parser(c.name, help=c.help))
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = {c.name: c for c in COMMANDS}[args.command]
    if not command.loads_models:
        return run_reporting_errors(command, args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # per-save "Writing model shards" bars would break up the round table
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    with private_tempdir():   # what vLLM and torch leave in the temp folder goes with the command
        return run_reporting_errors(command, args)


def run_reporting_errors(command: Command, args: argparse.Namespace) -> int:
    """The command's exit status; an error the user can act on is one line on stderr, not a traceback."""
    try:
        command.run(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, RunStopped) as e:
        if os.environ.get("RANK", "0") == "0":   # under a launcher every rank fails alike: say it once
            print(f"oaif: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # the machine, not the input: a full disk, a folder oaif may not write
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"oaif: error: cannot write {e.filename or ''}: {e.strerror}; free space or pick a writable "
                  f"output_dir, then run again (a run directory that exists: oaif resume it)", file=sys.stderr)
        return 2
    except StoppedAtOnce:   # a second SIGINT/SIGTERM during rounds (the first stops after the round, cleanly)
        return 130
    except KeyboardInterrupt:   # Ctrl-C outside the rounds (loading, the final evaluation)
        print(STOPPED_AT_ONCE, file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The `oaif` console script: main() in a process of its own (oaif/collector.py)."""
    with owned_process():
        code = main()
    sys.exit(code)


if __name__ == "__main__":
    entry()
