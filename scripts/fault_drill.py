"""Kill drill: SIGKILL a run again and again, resume it each time, and check that nothing was
lost, duplicated or corrupted and that no process outlived its run.

    .venv/bin/python scripts/fault_drill.py [--kills 30] [--rounds 6] [--out runs/fault_drill.md]

Two runs of the same config on the tiny policy, judged by the tiny model through the
`transformers` backend with a judgment cache (so the cache is drilled too): a reference run
left alone, and a drilled run killed `--kills` times and resumed (`oaif resume`, or `oaif run`
again when it died before its run directory existed) until it finishes. Every sample has its
own seed and the judge is deterministic, so the drilled run must end with the reference's
records and weights exactly. Two kills in three happen at a crash point (`OAIF_CRASH_AT`,
oaif/faults.py: after the samples are written, after the judgments, after an optimizer step,
at the weight sync, after the metrics line, half-way through a checkpoint), one in three at
a random moment of the process's life (start-up, vLLM's init, a write in progress).
After every kill no process carrying the drill's mark may remain, and every record file must
read back whole. The table is printed and written to --out; exit 1 if any count is not zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oaif.faults import POINTS  # noqa: E402

RECORDS = ("samples.jsonl", "judgments.jsonl", "pairs.jsonl")
# Metrics that measure time, or count what the judge was asked (not what the cache answered),
# differ between the runs by nature.
VOLATILE = ("seconds", "per_s", "cache_hits", "cache_misses", "requests", "prompt_tokens")


def oaif(args: list[str], env: dict, kill_after: float | None) -> tuple[int, float]:
    """Run `oaif ARGS` in its own session; SIGKILL it after kill_after seconds if still running."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "oaif.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"oaif {' '.join(args)} failed with exit code {proc.returncode}:\n{err[-3000:]}")
    return proc.returncode, time.monotonic() - t0


def marked_processes(mark: str) -> list[int]:
    """Processes whose environment carries the drill's mark (children inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if f"OAIF_DRILL={mark}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:   # gone meanwhile, or not ours to read
                pass
    return found


def read_lines(path: Path) -> tuple[list[str], int]:
    """(the file's records as canonical JSON, lines that are not whole JSON records)."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        bad += 1   # a torn last line
    for line in raw.decode(errors="replace").splitlines():
        try:
            records.append(json.dumps(json.loads(line), sort_keys=True))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def corrupt_lines(run_dir: Path, cache: Path) -> int:
    """Lines anywhere in the run's record files (and the cache) that do not read back whole."""
    files = [run_dir / "metrics.jsonl", cache, *run_dir.glob("rounds/*/*.jsonl")]
    return sum(read_lines(f)[1] for f in files)


def steady(record: str) -> str:
    """A metrics line without what measures time or cache use."""
    row = json.loads(record)
    return json.dumps({k: v for k, v in row.items() if not any(w in k for w in VOLATILE)}, sort_keys=True)


def compare(reference: Path, drilled: Path) -> dict:
    """lost: reference records the drilled run lacks; duplicated: records it holds twice;
    corrupt: records it holds that the reference does not (changed content)."""
    lost = duplicated = corrupt = 0
    files = [Path("metrics.jsonl")] + [Path("rounds") / d.name / f
                                       for d in sorted((reference / "rounds").iterdir()) for f in RECORDS]
    for rel in files:
        ref, got = read_lines(reference / rel)[0], read_lines(drilled / rel)[0]
        if rel.name == "metrics.jsonl":
            ref, got = [steady(r) for r in ref], [steady(r) for r in got]
        want, have = Counter(ref), Counter(got)
        lost += sum((want - have).values())
        duplicated += sum(n - 1 for n in have.values() if n > 1)
        corrupt += sum(n for r, n in have.items() if r not in want)
    extra_rounds = {d.name for d in (drilled / "rounds").iterdir()} - {d.name for d in (reference / "rounds").iterdir()}
    return {"lost": lost, "duplicated": duplicated, "corrupt": corrupt + len(extra_rounds)}


def cache_keys(path: Path) -> tuple[int, int]:
    """(entries, entries written twice) of a judgment cache."""
    keys = Counter(json.loads(r)["key"] for r in read_lines(path)[0])
    return len(keys), sum(n - 1 for n in keys.values())


def final_weights_equal(reference: Path, drilled: Path, rounds: int) -> bool:
    from safetensors.torch import load_file

    name = f"checkpoints/round_{rounds - 1:06d}/policy/model.safetensors"
    a, b = load_file(reference / name), load_file(drilled / name)
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="models/tiny")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill plan")
    ap.add_argument("--out", default="runs/fault_drill.md")
    ap.add_argument("--workdir", default="", help="where both runs go (default: a new temporary folder)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="oaif-drill-")).resolve()
    mark = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OAIF_DRILL": mark}
    common = ["configs/tiny_cpu.yaml", f"policy.model={args.model}", f"rounds={args.rounds}", "prompts_per_round=8",
              "train.checkpoint_every=2", "generate.enforce_eager=true", f"output_dir={work}",
              "annotate.backend=transformers", f"annotate.model={args.model}"]
    cache = {name: work / f"{name}_cache.jsonl" for name in ("reference", "drilled")}

    t0 = time.monotonic()
    _, life = oaif(["run", *common, "name=reference", f"annotate.cache={cache['reference']}"], env, None)
    print(f"reference run: {life:.1f} s")

    rng = random.Random(args.seed)
    plan = [("point", POINTS[i % len(POINTS)]) for i in range(args.kills - args.kills // 3)]
    plan += [("random", "")] * (args.kills // 3)
    rng.shuffle(plan)
    run_dir, kills, resumes, strays, corrupt_seen, by_stage = work / "drilled", 0, 0, 0, 0, Counter()
    last = run_dir / f"checkpoints/round_{args.rounds - 1:06d}"
    while True:
        start = ["resume", str(run_dir)] if run_dir.exists() else \
            ["run", *common, "name=drilled", f"annotate.cache={cache['drilled']}"]
        if last.is_dir():   # it finished before its kill came: rewind it to its first checkpoint
            start += ["--checkpoint", str(min((run_dir / "checkpoints").glob("round_??????")))]
        resumes += start[0] == "resume"
        kind, point = plan.pop() if plan else ("", "")
        child_env, kill_after = dict(env), None
        if kind == "point":   # the 1st-3rd time this process reaches the point
            child_env["OAIF_CRASH_AT"] = f"{point}:{rng.randint(1, 3)}"
        elif kind == "random":
            kill_after = rng.uniform(0.0, life)
        rc, _ = oaif(start, child_env, kill_after)
        if rc == 0:
            if not kind:
                break
            plan.append((kind, point))   # not killed: the same kill comes again
            continue
        kills += 1
        by_stage[point or "random"] += 1
        deadline = time.monotonic() + 10   # a server's parent-death signal takes a moment
        while (left := marked_processes(mark)) and time.monotonic() < deadline:
            time.sleep(0.2)
        strays += len(left)
        corrupt_seen += corrupt_lines(run_dir, cache["drilled"]) if run_dir.exists() else 0
        print(f"kill {kills:2d}: {point or 'random':10s} after {start[0]}, stray processes {len(left)}", flush=True)

    counts = compare(work / "reference", run_dir)
    entries, twice = cache_keys(cache["drilled"])
    equal = final_weights_equal(work / "reference", run_dir, args.rounds)
    rows = [("kills", kills), ("kills by moment", ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items()))),
            ("resumes", resumes), ("lost records", counts["lost"]), ("duplicated records", counts["duplicated"]),
            ("corrupt records", counts["corrupt"] + corrupt_seen), ("cache entries (written twice)", f"{entries} ({twice})"),
            ("stray processes", strays), ("final weights equal the uninterrupted run's", "yes" if equal else "NO"),
            ("wall time", f"{time.monotonic() - t0:.0f} s")]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    cmd = f"python scripts/fault_drill.py --kills {args.kills} --rounds {args.rounds} --seed {args.seed}"
    text = f"Kill drill, {time.strftime('%Y-%m-%d')}: `{cmd}`\n\n{table}\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    ok = kills >= args.kills and equal and strays == 0 and twice == 0 and \
        counts["lost"] == counts["duplicated"] == counts["corrupt"] + corrupt_seen == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
