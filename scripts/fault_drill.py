"""Kill drill: SIGKILL a run again and again, resume it each time, and check that nothing was
lost, duplicated or corrupted and that nothing (process, shared-memory or temp file) outlived
the run.

    .venv/bin/python scripts/fault_drill.py [--mode inprocess|async|server|lora|two_process|all]
        [--kills 30] [--rounds 6] [--points a,b] [--out runs/fault_drill.md]

Per mode, two runs of the same config on the tiny policy, judged by the tiny model through the
`transformers` backend with a judgment cache (so the cache is drilled too) and evaluated every
2 rounds on 2 held-out prompts: a reference run left alone, and a drilled run killed `--kills`
times and resumed (`oaif resume`, or `oaif run` again when it died before its run directory
existed; a run that finished before its kill came is rewound to its first checkpoint) until
it finishes with no kill left. Every sample has its own seed and the judge is deterministic,
so the drilled run must end with the reference's records and weights exactly.

Two kills in three happen at a crash point (`OAIF_CRASH_AT=NAME:N`, the Nth time the process
passes NAME; every point of oaif/faults.py, in a seeded order), one in three at a random
moment of the process's life (start-up, vLLM's init, a write in progress). The `report`
point kills an `oaif report RUN_DIR` started between two resumes; the report is then made
again and the run goes on. A point a mode never passes is named in the table and its kill
goes to another point.

The modes (MODES): `inprocess` (one process, the engine in it), `async` (async_rounds=1: the
engine in a process of its own), `server` (generate.server_url: the drill starts a vLLM
OpenAI server as a user would, `python -m vllm.entrypoints.openai.api_server` with
VLLM_SERVER_DEV_MODE=1, through oaif.engine.server.start_server; it lives through every kill and
serves both runs), `lora` (a LoRA adapter handed to vLLM as a LoRARequest, train.lora.sync
vllm_lora) and `two_process` (2 ranks under `accelerate launch`, gloo on CPUs; rank 0 starts
and owns a vLLM server; no in-loop evaluation there).

After every kill: no process carrying the drill's mark may remain (left ones are counted,
then killed), no new /dev/shm entry of the names oaif and the vLLM it runs use (oaif-weights-*,
sem.mp-*, psm_*, torch_* in /dev/shm) and no new entry of the drill's temp folder (every
command's TMPDIR; torch's compile cache aside) that no live process holds (counted, named,
then removed), and every record file must read back whole. Two kinds are named apart: a
killed command's own temp folder (oaif-tmp-PID, oaif/scratch.py), which the next command
sweeps (one still there when the mode ends is a stray), and what a killed `accelerate
launch` made before oaif ran (torchelastic_*), which is not oaif's. At the end no hidden
partial folder may be left in the run directory. The table (one column per mode) is printed
and written to --out; exit 1 if any count is not zero.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oaif.faults import POINTS  # noqa: E402

RECORDS = ("samples.jsonl", "judgments.jsonl", "pairs.jsonl")
# Metrics that measure time, count what the judge was asked (not what the cache answered), or
# say what a process found at its start (startup/*, in a resumed process's first round) differ
# between the runs by nature.
VOLATILE = ("seconds", "per_s", "cache_hits", "cache_misses", "requests", "prompt_tokens", "startup/")
PLAIN = (sys.executable, "-m", "oaif.cli")
ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), "-m", "oaif.cli")
SHM = Path("/dev/shm")
# What libraries keep in the temp folder on purpose, from run to run: not a leftover.
CACHES = ("torchinductor_",)
SCRATCH = "oaif-tmp-"   # a command's own temp folder (oaif/scratch.py): a killed one's is swept by the next
LAUNCHER_TEMP = ("torchelastic_",)   # made by `accelerate launch` itself, before oaif runs: not oaif's
SERVER_KEY = "DRILL_SERVER_API_KEY"   # server mode: the variable that hands the runs the server's key


@dataclass(frozen=True)
class Mode:
    overrides: tuple[str, ...] = ()
    launcher: tuple[str, ...] = PLAIN
    own_server: bool = False       # the drill starts a vLLM server and passes generate.server_url
    unreached: tuple[str, ...] = ()   # crash points the mode never passes


MODES = {
    "inprocess": Mode(),
    "async": Mode(overrides=("async_rounds=1",)),
    "server": Mode(own_server=True),
    "lora": Mode(overrides=("train.lora.enabled=true", "train.lora.sync=vllm_lora")),
    "two_process": Mode(overrides=("eval.every=0",), launcher=ACCELERATE, unreached=("evaluate",)),
}


@dataclass
class Tally:
    kills: int = 0
    resumes: int = 0
    by_moment: Counter = field(default_factory=Counter)
    not_reached: set = field(default_factory=set)
    strays: int = 0
    shm: int = 0
    temp: int = 0
    scratch_left: int = 0   # temp folders of killed commands, for the next command to sweep
    launcher_temp: int = 0  # left by a killed launcher (LAUNCHER_TEMP), not by oaif
    pushes_left: int = 0    # weight copies a push killed half-way left, for the next push to sweep
    misses: Counter = field(default_factory=Counter)   # attempts that did not pass their crash point
    corrupt_seen: int = 0
    reports: int = 0
    reports_remade: int = 0
    kill_seconds: list = field(default_factory=list)   # each killed attempt's life


def oaif(launcher: tuple[str, ...], args: list[str], env: dict, kill_after: float | None,
         limit: float) -> tuple[bool, float]:
    """Run `oaif ARGS` in its own session; SIGKILL it after kill_after seconds if still
    running. Returns (killed, seconds). A launcher whose rank was SIGKILLed (at a crash
    point) exits 1 and says so; any other failure stops the drill."""
    t0 = time.monotonic()
    proc = subprocess.Popen([*launcher, *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else limit)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        if kill_after is None:
            raise SystemExit(f"oaif {' '.join(args)} ran past {limit:.0f} s (hung?):\n{err[-3000:]}") from None
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return False, seconds
    if proc.returncode == -signal.SIGKILL or (launcher != PLAIN and "Signal 9 (SIGKILL)" in err):
        return True, seconds
    raise SystemExit(f"oaif {' '.join(args)} failed with exit code {proc.returncode}:\n{err[-3000:]}")


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


def leftover_processes(mark: str) -> int:
    """Marked processes still alive 10 s after a kill (a server's parent-death signal takes a
    moment); they are counted, then killed so that the next attempt starts clean."""
    deadline = time.monotonic() + 10
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            print(f"    stray process {pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def shm_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm files a process has mapped or open (a semaphore's or shared
    memory's name may be gone from its maps: glibc links a temp file to the name)."""
    found = set()
    proc = Path(f"/proc/{pid}")
    try:
        for line in (proc / "maps").read_text().splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith(f"{SHM}/"):
                found.add(int(fields[4]))
        for fd in (proc / "fd").iterdir():
            if os.readlink(fd).startswith(f"{SHM}/"):
                found.add(fd.stat().st_ino)
    except OSError:   # it ended meanwhile
        pass
    return found


class Watch(threading.Thread):
    """While an attempt runs: the inodes of the /dev/shm files the drill's processes use, so
    that a leftover there is known as theirs (other programs on the machine make such files too)."""

    def __init__(self, mark: str):
        super().__init__(daemon=True)
        self.mark, self.inodes, self.done = mark, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            for pid in marked_processes(self.mark):
                self.inodes |= shm_inodes(pid)

    def stop(self) -> set[int]:
        self.done.set()
        self.join()
        return self.inodes


def entries(*folders: Path) -> set[Path]:
    return {p for f in folders if f.is_dir() for p in f.iterdir()}


def held_paths() -> set[str]:
    """Paths some live process has open or mapped."""
    held = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            held.update(os.readlink(fd) for fd in (d / "fd").iterdir())
            held.update(line.split(None, 5)[5].strip() for line in (d / "maps").read_text().splitlines()
                        if len(line.split(None, 5)) == 6)
        except OSError:
            pass
    return held


def leftovers(before: set[Path], now: set[Path], ours: set[int], own: tuple[Path, ...]) -> list[Path]:
    """Entries that appeared since `before`, that no live process holds, and that are the
    drill's: in one of its `own` folders, or a /dev/shm file one of its processes used."""
    held = held_paths()
    new = [p for p in now - before if not p.name.startswith(CACHES)
           and not any(h == str(p) or h.startswith(f"{p}/") for h in held)]
    return sorted(p for p in new if p.parent in own or (p.exists() and p.stat().st_ino in ours))


def remove(paths: list[Path], what: str) -> None:
    for p in paths:
        print(f"    stray {what}: {p}")
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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


def record_files(run_dir: Path) -> list[Path]:
    """The run's JSONL records, relative to it."""
    files = [Path(n) for n in ("metrics.jsonl", "replicas.jsonl") if (run_dir / n).is_file()]
    files += [p.relative_to(run_dir) for p in sorted(run_dir.glob("rounds/*/*.jsonl"))]
    return files + [p.relative_to(run_dir) for p in sorted(run_dir.glob("eval/*.jsonl"))]


def corrupt_lines(run_dir: Path, cache: Path) -> int:
    """Lines anywhere in the run's record files (and the cache) that do not read back whole."""
    return sum(read_lines(f)[1] for f in [cache, *(run_dir / r for r in record_files(run_dir))])


def steady(record: str) -> str:
    """A metrics line without what measures time or cache use."""
    row = json.loads(record)
    return json.dumps({k: v for k, v in row.items() if not any(w in k for w in VOLATILE)}, sort_keys=True)


def dataset_rows(path: Path) -> list[str]:
    """The rows of an exported pairs dataset (parquet), as canonical JSON."""
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return [json.dumps(r, sort_keys=True) for r in pq.read_table(path).to_pylist()]


def compare(reference: Path, drilled: Path) -> dict:
    """lost: reference records the drilled run lacks; duplicated: records it holds twice;
    corrupt: records it holds that the reference does not (changed content), and whole
    record files the reference has not. Over every JSONL record and the exported datasets.
    `differs`: the files where they differ, first few."""
    lost = duplicated = corrupt = 0
    differs = []
    names = sorted(set(record_files(reference)) | set(record_files(drilled)))
    exported = [Path("dataset") / n for n in ("preference.parquet", "kto.parquet")]
    for rel in names + exported:
        if rel.suffix == ".parquet":
            ref, got = dataset_rows(reference / rel), dataset_rows(drilled / rel)
        else:
            ref, got = read_lines(reference / rel)[0], read_lines(drilled / rel)[0]
        if rel.name == "metrics.jsonl":
            ref, got = [steady(r) for r in ref], [steady(r) for r in got]
        want, have = Counter(ref), Counter(got)
        missing = sum((want - have).values())
        twice = sum(n - 1 for n in have.values() if n > 1)
        changed = sum(n for r, n in have.items() if r not in want)
        lost, duplicated, corrupt = lost + missing, duplicated + twice, corrupt + changed
        if missing or twice or changed:
            differs.append(f"{rel} ({missing} lost, {twice} twice, {changed} changed)")
    return {"lost": lost, "duplicated": duplicated, "corrupt": corrupt, "differs": differs}


def cache_keys(path: Path) -> tuple[int, int]:
    """(entries, entries written twice) of a judgment cache (its header line aside)."""
    keys = Counter(row["key"] for row in map(json.loads, read_lines(path)[0]) if "key" in row)
    return len(keys), sum(n - 1 for n in keys.values())


def final_weights_equal(reference: Path, drilled: Path, rounds: int) -> bool:
    """The last checkpoint's policy weights (full, or a LoRA adapter), tensor for tensor."""
    from safetensors.torch import load_file

    policy = Path(f"checkpoints/round_{rounds - 1:06d}/policy")
    files = sorted(p.name for p in (reference / policy).glob("*.safetensors"))
    if not files or files != sorted(p.name for p in (drilled / policy).glob("*.safetensors")):
        return False
    for name in files:
        a, b = load_file(reference / policy / name), load_file(drilled / policy / name)
        if a.keys() != b.keys() or not all(bool((a[k] == b[k]).all()) for k in a):
            return False
    return True


def run_leftovers(run_dir: Path) -> list[str]:
    """Hidden partial folders or files a write cut short left in the run directory (its lock
    file and the markers of oaif's outputs aside): a report's or an export's staging folder,
    a .tmp record or checkpoint."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if (p.name.startswith(".") and p.name != ".oaif.lock" and not p.name.endswith(".oaif-output"))
                  or p.name.endswith(".tmp"))


class Drill:
    """One mode's drill: the reference run, then the drilled run with its kills and resumes."""

    def __init__(self, name: str, mode: Mode, args, work: Path, mark: str):
        self.name, self.mode, self.args, self.mark = name, mode, args, mark
        self.tally = Tally(not_reached=set(mode.unreached))
        self.run_dir = work / "drilled"
        # The drill's own folders for what a run puts in /dev/shm and the temp folder (a server's
        # weights, its log, ...): whatever is left there after a run is the drill's.
        self.weights_dir = SHM / f"oaif-drill-{mark}-{name}"
        self.temp_dir = work / "tmp"
        self.env = {**os.environ, "OAIF_DRILL": mark, "TMPDIR": str(self.temp_dir)}
        self.cache = {run: work / f"{run}_cache.jsonl" for run in ("reference", "drilled")}
        self.common = ["configs/tiny_cpu.yaml", f"policy.model={args.model}", f"rounds={args.rounds}",
                       "prompts_per_round=8", "train.checkpoint_every=2", "generate.enforce_eager=true",
                       f"generate.server_weights_dir={self.weights_dir}", f"output_dir={work}",
                       "annotate.backend=transformers", f"annotate.model={args.model}",
                       "eval.every=2", "eval.max_prompts=2", "eval.bootstrap=100", *mode.overrides]
        self.limit = args.limit

    def attempt(self, launcher: tuple[str, ...], args: list[str], env: dict,
                kill_after: float | None = None) -> tuple[bool, float, str]:
        """One `oaif` process (killed or not), then what it left behind: processes, /dev/shm
        entries and temp files, each counted, named and removed. Returns (killed, seconds,
        the counts in words)."""
        own = (self.weights_dir, self.temp_dir)
        before = entries(SHM, *own)
        watch = Watch(self.mark)
        watch.start()
        try:
            killed, seconds = oaif(launcher, args, env, kill_after, self.limit)
            strays = leftover_processes(self.mark)
        finally:
            ours = watch.stop()
        found = leftovers(before, entries(SHM, *own), ours, own)
        # A push killed half-way leaves its weight copy: the next push removes it (not the
        # drill), and one still there when the mode ends is a stray (column()).
        pushed = [p for p in found if p.parent == self.weights_dir and p.name.startswith("oaif-weights-")]
        shm = [p for p in found if p.is_relative_to(SHM) and p not in pushed]
        scratch = [p for p in found if p.parent == self.temp_dir and p.name.startswith(SCRATCH)]
        launcher = [p for p in found if p.parent == self.temp_dir and p.name.startswith(LAUNCHER_TEMP)]
        temp = [p for p in found if p.parent == self.temp_dir and p not in scratch + launcher]
        remove(shm, "/dev/shm entry")
        remove(temp, "temp file")
        remove(launcher, "launcher's temp file")
        t = self.tally
        t.strays, t.shm, t.temp = t.strays + strays, t.shm + len(shm), t.temp + len(temp)
        t.scratch_left += len(scratch)
        t.launcher_temp += len(launcher)
        t.pushes_left += len(pushed)
        return killed, seconds, (f"stray processes {strays}, /dev/shm {len(shm)}, temp {len(temp)} "
                                 f"(killed command's folder {len(scratch)}, launcher's {len(launcher)})")

    def run(self) -> dict:
        self.weights_dir.mkdir()
        self.temp_dir.mkdir(parents=True)
        server = None
        try:
            if self.mode.own_server:
                server = self.start_server()
            return self.drill()
        finally:
            if server is not None:
                from oaif.engine.server import stop_server

                stop_server(server)
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    def start_server(self):
        """Server mode: a vLLM OpenAI server as a user starts one (oaif.engine.server.start_server:
        `python -m vllm.entrypoints.openai.api_server` with the weight endpoints on, the
        weight-transfer setting of the config's server_weight_sync and a random key), for both
        runs; it lives through every kill."""
        from oaif.config import load_config
        from oaif.engine.server import server_key, start_server, transfer_args

        cfg = load_config(ROOT / "configs/tiny_cpu.yaml", self.common[1:])
        g = cfg.generate
        server = start_server(self.args.model, None, cfg.policy.dtype, cfg.seed,
                              cfg.policy.max_prompt_tokens + g.max_new_tokens, g.kv_cache_gib,
                              ["--enforce-eager", *transfer_args(g.server_weight_sync)])
        url = f"http://127.0.0.1:{server.port}"
        self.common += [f"generate.server_url={url}", f"generate.server_api_key_env={SERVER_KEY}"]
        self.env[SERVER_KEY] = server_key(url)
        return server

    def report_kill(self, rng: random.Random) -> bool | None:
        """`oaif report RUN_DIR`, killed at the report point, then made again (it must
        succeed). None when the run has no round recorded yet (nothing to report: try
        later); else whether the kill came."""
        if not read_lines(self.run_dir / "metrics.jsonl")[0]:
            return None
        # N=2 (between swapping the old report out and the new one in) needs an old report.
        nth = rng.choice([1, 2]) if (self.run_dir / "report/report.html").is_file() else 1
        report = ["report", str(self.run_dir)]
        killed, seconds, left = self.attempt(PLAIN, report, {**self.env, "OAIF_CRASH_AT": f"report:{nth}"})
        if killed:
            t = self.tally
            t.reports += 1
            t.kills += 1
            t.by_moment["report"] += 1
            t.kill_seconds.append(seconds)
            again, _, _ = self.attempt(PLAIN, report, self.env)
            made = not again and (self.run_dir / "report/report.html").is_file()
            t.reports_remade += made
            print(f"[{self.name}] kill {t.kills:2d}: report:{nth}      after {seconds:5.1f} s; {left}; "
                  f"made again: {'yes' if made else 'NO'}", flush=True)
        return killed

    def drill(self) -> dict:
        args, mode, t, run_dir, t0 = self.args, self.mode, self.tally, self.run_dir, time.monotonic()
        _, life, left = self.attempt(mode.launcher, ["run", *self.common, "name=reference",
                                                     f"annotate.cache={self.cache['reference']}"], self.env)
        self.limit = min(args.limit, 5 * life + 300)   # a resumed run that takes this long has hung
        print(f"[{self.name}] reference run: {life:.1f} s; {left}", flush=True)

        rng = random.Random(args.seed)
        points = [p for p in (args.points.split(",") if args.points else POINTS) if p not in mode.unreached]
        rng.shuffle(points)
        plan = [("point", points[i % len(points)], 0) for i in range(args.kills - args.kills // 3)]
        plan += [("random", "", 0)] * (args.kills // 3)
        rng.shuffle(plan)
        last = run_dir / f"checkpoints/round_{args.rounds - 1:06d}"
        while True:
            kind, point, nth = plan.pop() if plan else ("", "", 0)
            if point == "report":
                killed = self.report_kill(rng) if run_dir.exists() else None
                if killed is not None:
                    if not killed:
                        t.not_reached.add("report")
                    continue
                plan.insert(0, (kind, point, nth))   # no round recorded yet: after the next attempt,
                if any(p != "report" for _, p, _ in plan):
                    continue
                kind, point, nth = "", "", 0          # a whole run if nothing else is left
            start = ["resume", str(run_dir)] if run_dir.exists() else \
                ["run", *self.common, "name=drilled", f"annotate.cache={self.cache['drilled']}"]
            if last.is_dir():   # it finished before its kill came: rewind it to its first checkpoint
                start += ["--checkpoint", str(min((run_dir / "checkpoints").glob("round_??????")))]
            t.resumes += start[0] == "resume"
            env, kill_after = dict(self.env), None
            if kind == "point":
                nth = nth or rng.randint(1, 3)   # the 1st-3rd time this process reaches the point
                env["OAIF_CRASH_AT"] = f"{point}:{nth}"
            elif kind == "random":
                kill_after = rng.uniform(0.0, life)
            killed, seconds, left = self.attempt(mode.launcher, start, env, kill_after)
            if not killed:
                if not kind:
                    if plan:   # a report's kill waited for this run's records
                        continue
                    break
                if kind == "point" and nth > 1:
                    plan.append((kind, point, 1))   # passed fewer than nth times: the first time, then
                elif kind == "point":   # not passed (a round that kept no pairs trains nothing): later,
                    t.misses[point] += 1            # and after 3 such attempts another point instead
                    if t.misses[point] < 3:
                        plan.insert(0, (kind, point, 1))
                    else:
                        t.not_reached.add(point)
                        plan.append((kind, rng.choice([p for p in points if p not in t.not_reached]), 0))
                else:
                    plan.append((kind, point, 0))   # the run ended before the random moment came
                continue
            t.kills += 1
            t.kill_seconds.append(seconds)
            t.by_moment[point or "random"] += 1
            t.corrupt_seen += corrupt_lines(run_dir, self.cache["drilled"]) if run_dir.exists() else 0
            what = f"{point}:{nth}" if point else "random"
            print(f"[{self.name}] kill {t.kills:2d}: {what:12s} after {seconds:5.1f} s of {start[0]}; {left}",
                  flush=True)
        return self.column(life, time.monotonic() - t0)

    def column(self, life: float, wall: float) -> dict:
        """The mode's column of the table, and whether every count is zero."""
        t, work = self.tally, self.run_dir.parent
        counts = compare(work / "reference", self.run_dir)
        cached, twice = cache_keys(self.cache["drilled"])
        equal = final_weights_equal(work / "reference", self.run_dir, self.args.rounds)
        partial = run_leftovers(self.run_dir)
        unswept = sorted(self.weights_dir.glob("oaif-weights-*"))
        remove(unswept, "/dev/shm weight copy the next push did not sweep")
        t.shm += len(unswept)
        unswept = sorted(self.temp_dir.glob(f"{SCRATCH}*"))
        remove(unswept, "temp folder of a killed command the next command did not sweep")
        t.temp += len(unswept)
        for what in counts["differs"]:
            print(f"[{self.name}] differs: {what}")
        for what in partial:
            print(f"[{self.name}] left in the run directory: {what}")
        corrupt = counts["corrupt"] + t.corrupt_seen
        ok = t.kills >= self.args.kills and equal and not (t.strays or t.shm or t.temp or twice or partial) \
            and counts["lost"] == counts["duplicated"] == corrupt == 0 and t.reports_remade == t.reports
        per_kill = sum(t.kill_seconds) / len(t.kill_seconds) if t.kill_seconds else 0.0
        column = {
            "kills": t.kills,
            "kills by moment": ", ".join(f"{k} {v}" for k, v in sorted(t.by_moment.items())),
            "crash points not passed": ", ".join(sorted(t.not_reached)) or "-",
            "resumes": t.resumes,
            "lost records": counts["lost"],
            "duplicated records": counts["duplicated"],
            "corrupt records": corrupt,
            "cache entries (written twice)": f"{cached} ({twice})",
            "stray processes": t.strays,
            "stray /dev/shm entries": t.shm,
            "weight copies left by a killed push, swept by the next": t.pushes_left,
            "stray temp files": t.temp,
            "temp folders of killed commands, swept by the next": t.scratch_left,
            "temp files of a killed `accelerate launch` (not oaif's; not counted)": t.launcher_temp,
            "partial files left in the run directory": len(partial),
            "reports made again after their kill": f"{t.reports_remade} of {t.reports}",
            "final weights equal the uninterrupted run's": "yes" if equal else "NO",
            "reference run": f"{life:.0f} s",
            "seconds per kill: killed process's life; wall / kills": f"{per_kill:.0f}; {wall / max(t.kills, 1):.0f}",
            "wall time": f"{wall:.0f} s",
        }
        return {"column": column, "ok": ok}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    threads = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    return (f"{cpu}, {os.cpu_count()} CPUs; {threads}; config threads=0 (torch's default) and async_threads=1 "
            f"(configs/tiny_cpu.yaml)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", "--modes", default="inprocess",
                    help=f"one mode, several (a,b), or all: {', '.join(MODES)}")
    ap.add_argument("--kills", type=int, default=30, help="per mode")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--points", default="",
                    help="only these crash points (a,b; default: every point in oaif/faults.py)")
    ap.add_argument("--model", default="models/tiny")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill plan")
    ap.add_argument("--limit", type=float, default=1800.0, help="seconds after which a run counts as hung")
    ap.add_argument("--out", default="runs/fault_drill.md")
    ap.add_argument("--workdir", default="", help="where the runs go (default: a new temporary folder)")
    args = ap.parse_args()
    modes = list(MODES) if args.mode == "all" else args.mode.split(",")
    unknown = [m for m in modes if m not in MODES] + \
        [p for p in args.points.split(",") if args.points and p not in POINTS]
    if unknown:
        ap.error(f"unknown mode or crash point: {', '.join(unknown)} (modes: {', '.join(MODES)}; "
                 f"points: {', '.join(POINTS)})")
    if args.rounds < 3:
        ap.error("--rounds: at least 3 (a finished run is rewound to its first checkpoint, after round 1)")
    args.model = str(Path(args.model).resolve())

    work = Path(args.workdir or tempfile.mkdtemp(prefix="oaif-drill-")).resolve()
    mark = f"{os.getpid()}-{time.time_ns()}"
    try:
        results = {m: Drill(m, MODES[m], args, work / m, mark).run() for m in modes}
    finally:   # a drill stopped by an error or a hang leaves none of its processes behind
        for pid in marked_processes(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    rows = list(next(iter(results.values()))["column"])
    table = "| | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes) + "\n" + "\n".join(
        f"| {row} | " + " | ".join(str(results[m]["column"][row]) for m in modes) + " |" for row in rows)
    cmd = (f"python scripts/fault_drill.py --mode {args.mode} --kills {args.kills} --rounds {args.rounds} "
           f"--seed {args.seed}" + (f" --points {args.points}" if args.points else ""))
    text = f"Kill drill, {time.strftime('%Y-%m-%d')}: `{cmd}`\n\nMachine: {machine()}\n\n{table}\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
