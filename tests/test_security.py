"""Security and leaks: checkpoints load no code, the servers oaif starts answer only its own
clients, keys go nowhere they should not, and what oaif starts or creates ends with it.
(The real server's checks are in test_server_mode.py, on the server it starts anyway.)"""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from oaif.checkpoint import read_trainer_state
from oaif.engine.server import stop_server


class Planted:
    """Unpickling it runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the checkpoint ran code"))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    checkpoint, marker = tmp_path / "round_000000", tmp_path / "ran"
    checkpoint.mkdir()
    torch.save({"round": 0, "optimizer": Planted(marker)}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match=r"trainer.pt: refused: .* could run code \(.*GLOBAL getattr"):
        read_trainer_state(checkpoint)
    assert not marker.exists()


def test_the_trainer_state_oaif_saves_loads_without_unpickling_code(tmp_path):
    """What save_checkpoint writes (optimizer, LambdaLR, both RNG states) passes weights_only."""
    import random

    from oaif.checkpoint import save_checkpoint

    class Trainer:   # the attributes save_checkpoint reads, with a real optimizer and schedule
        def __init__(self):
            self.policy = torch.nn.Linear(2, 2)
            self.policy.save_pretrained = lambda path, state_dict=None: Path(path).mkdir(parents=True)
            self.optimizer = torch.optim.AdamW(self.policy.parameters())
            self.policy(torch.ones(1, 2)).sum().backward()
            self.optimizer.step()
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.5)
            self.steps, self.total_steps, self.anchor, self.accelerator = 1, 10, (1, 0.5), None

    class Tokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{}")

    trainer = Trainer()
    checkpoint = save_checkpoint(tmp_path, 0, 1, trainer, Tokenizer())
    state = read_trainer_state(checkpoint)
    assert state["python_rng"] == random.getstate() and state["schedule"]["anchor"] == (1, 0.5)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            state, _, pgrp = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry))
    return pids


def start_group(child: str) -> tuple[subprocess.Popen, int]:
    """A leader in its own session (as spawn_server starts the server) that starts `child`
    (Python code) in its group, prints the child's pid and exits: what a vLLM server whose
    engine core outlives it leaves."""
    leader = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {child!r}])
        print(child.pid, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", leader], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(proc.stdout.readline())
    proc.stdout.close()
    proc.log = tempfile.TemporaryFile()
    proc.port = 0
    return proc, child_pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("child, timeout_s", [
    ("import time; time.sleep(600)", 30.0),
    # Deaf to SIGTERM: it gets SIGKILL after the timeout.
    ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)", 1.0),
])
def test_stop_server_ends_the_whole_group_after_its_leader_exited(child, timeout_s):
    proc, child_pid = start_group(child)
    try:
        proc.wait(30)
        time.sleep(0.3)   # the child's signal disposition is set
        assert group_members(proc.pid) == [child_pid]   # the leader is gone, its child lives on
        t0 = time.monotonic()
        stop_server(proc, timeout_s=timeout_s)
        assert group_members(proc.pid) == []   # gone when stop_server returns
        assert time.monotonic() - t0 < timeout_s + 10
        assert proc.log.closed
    finally:
        for pid in group_members(proc.pid):
            os.kill(pid, signal.SIGKILL)


# Keys: which variable may hold one, where it may be sent, and that URLs hold none.

@pytest.mark.parametrize("name, ok", [
    ("OPENAI_API_KEY", True), ("MY_JUDGE_KEY", True), ("", True),   # empty: no key sent
    ("HF_TOKEN", False), ("GITHUB_TOKEN", False), ("AWS_SECRET_ACCESS_KEY", False), ("SSH_PRIVATE_KEY", False),
    ("DB_PASSWORD", False), ("HOME", False), ("openai_api_key", False), ("PASSWORD_KEY", False),
])
def test_only_an_api_key_variable_may_be_named(name, ok):
    from oaif.config import ConfigError, load_config

    for field in ("annotate.openai.api_key_env", "eval.annotate.openai.api_key_env", "generate.server_api_key_env"):
        overrides = [f"{field}={name}"] + (["eval.annotate.backend=rules"] if field.startswith("eval") else [])
        if ok:
            load_config("configs/tiny_cpu.yaml", overrides)
        else:
            with pytest.raises(ConfigError, match=rf"{field}: '{name}' does not look like an API key's variable"):
                load_config("configs/tiny_cpu.yaml", overrides)


@pytest.mark.parametrize("url, key_set, problem", [
    ("https://judge.example.com/v1", True, None),
    ("http://127.0.0.1:8001/v1", True, None), ("http://localhost:8001/v1", True, None),
    ("http://[::1]:8001/v1", True, None),
    ("http://10.0.0.7:8001/v1", False, None),   # no key to carry
    ("http://10.0.0.7:8001/v1", True, "plain http to 10.0.0.7 would carry the key in $OAIF_TEST_JUDGE_KEY"),
    ("http://judge.internal/v1", True, "plain http to judge.internal would carry the key"),
    ("https://user:sk-planted@judge.example.com/v1", False, "holds credentials"),
    ("https://judge.example.com/v1?api_key=sk-planted", False, "holds credentials"),
])
def test_a_key_goes_only_over_https_or_to_this_machine_and_never_in_the_url(url, key_set, problem, monkeypatch):
    from oaif.config import ConfigError, load_config

    if key_set:
        monkeypatch.setenv("OAIF_TEST_JUDGE_KEY", "sk-planted")
    for url_field, key_field, url_value in (("annotate.openai.base_url", "annotate.openai.api_key_env", url),
                                            ("generate.server_url", "generate.server_api_key_env",
                                             url.removesuffix("/v1"))):
        overrides = [f"{url_field}={url_value}", f"{key_field}=OAIF_TEST_JUDGE_KEY"]
        if problem is None:
            load_config("configs/tiny_cpu.yaml", overrides)
            continue
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny_cpu.yaml", overrides)
        assert f"{url_field}: {problem}" in str(e.value) and "sk-planted" not in str(e.value)


def test_a_judge_built_without_a_config_file_checks_its_endpoint_too(monkeypatch):
    from oaif.annotate.base import load_template
    from oaif.annotate.openai_api import OpenAIAnnotator
    from oaif.config import AnnotateConfig, ConfigError, OpenAIConfig
    from oaif.constitution import load_constitution

    monkeypatch.setenv("OAIF_TEST_JUDGE_KEY", "sk-planted")
    constitution = load_constitution("constitutions/helpful.yaml")
    cfg = AnnotateConfig(openai=OpenAIConfig(base_url="http://10.0.0.7/v1", api_key_env="OAIF_TEST_JUDGE_KEY"))
    with pytest.raises(ConfigError, match="annotate.openai.base_url: plain http to 10.0.0.7"):
        OpenAIAnnotator(cfg, "m", constitution, load_template("prompts/judge.txt", constitution))


def test_credentials_in_a_url_stop_the_run_before_anything_is_written(tmp_path):
    from conftest import oaif_main

    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", "annotate.backend=openai",
                 "annotate.openai.base_url=https://oaif:sk-planted-in-url@judge.example.com/v1")
    assert r.returncode == 2 and "annotate.openai.base_url: holds credentials" in r.stderr, r.stderr[-2000:]
    assert "sk-planted-in-url" not in r.stdout + r.stderr and list(tmp_path.iterdir()) == []


def test_a_config_built_in_code_gets_the_same_check_before_a_run_writes_anything():
    """Loop, eval and best-of-n call check_inputs before they write; load_config was skipped."""
    import dataclasses

    from oaif.annotate.backends import check_inputs
    from oaif.config import ConfigError, load_config

    cfg = load_config("configs/tiny_cpu.yaml", ["annotate.backend=openai"])
    a = cfg.annotate
    planted = dataclasses.replace(a.openai, base_url="https://oaif:sk-planted@judge.example.com/v1")
    with pytest.raises(ConfigError, match="annotate.openai.base_url: holds credentials") as e:
        check_inputs(dataclasses.replace(cfg, annotate=dataclasses.replace(a, openai=planted)))
    assert "sk-planted" not in str(e.value)


# Loop.close frees what the judges hold.

class Holder:
    """A judge (an annotator object) that holds something until closed."""

    def __init__(self):
        self.closed = 0

    def judge(self, requests):
        return []

    def close(self):
        self.closed += 1


def test_loop_close_closes_every_judge_and_the_server_client(tmp_path):
    from types import SimpleNamespace

    from oaif.annotate.cache import CachedAnnotator
    from oaif.annotate.mix import MixAnnotator
    from oaif.config import load_config
    from oaif.loop import Loop

    train_judges, eval_judge, client = [Holder(), Holder()], Holder(), Holder()
    loop = Loop(load_config("configs/tiny_cpu.yaml"))
    loop.judge.annotator = MixAnnotator([(CachedAnnotator(train_judges[0], tmp_path / "cache.jsonl", {}), 1.0),
                                         (train_judges[1], 1.0)])
    loop.evaluator = SimpleNamespace(annotator=eval_judge)   # eval.annotate: a judge of its own
    loop.generator = SimpleNamespace(engine=client)   # the policy's engine (here a server's client)
    loop.close()
    assert [j.closed for j in (*train_judges, eval_judge, client)] == [1, 1, 1, 1]


def test_weights_left_by_a_killed_push_are_swept_by_the_next(tmp_path):
    """A push killed mid-way (SIGKILL runs no cleanup) leaves a whole weight copy in /dev/shm;
    the next push removes every such folder whose process is gone, and only those."""
    from oaif.scratch import sweep_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        (tmp_path / f"oaif-weights-{pid}-abc").mkdir()
    (tmp_path / "oaif-weights-notapid").mkdir()
    (tmp_path / "someone-elses").mkdir()
    sweep_orphans(tmp_path, "oaif-weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"oaif-weights-{os.getpid()}-abc", "oaif-weights-notapid", "someone-elses"])
