"""oaif outside its checkout: the bundled constitutions, templates and prompt sets are found by
name from any folder and ship in the wheel; a config's relative paths are its folder's;
`oaif init` makes a project that runs with nothing from the checkout but the model."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from oaif.bundled import DATA, data_path
from oaif.config import load_config
from oaif.constitution import load_constitution
from oaif.datasets_io import load_prompts

from conftest import ROOT, oaif_main


def test_names_and_checkout_paths_find_the_bundled_files_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no constitutions/ or prompts/ here
    assert data_path("concise") == DATA / "constitutions/concise.yaml"
    assert data_path("constitutions/concise.yaml") == DATA / "constitutions/concise.yaml"
    assert data_path("judge") == DATA / "prompts/judge.txt"
    cfg = load_config(None)   # every default is a name: nothing depends on the working folder
    assert load_constitution(cfg.annotate.constitution).name == "concise"
    assert len(load_prompts(cfg.prompts)) == len(load_prompts(ROOT / "prompts/tiny_prompts.jsonl")) > 0
    # A name or path that is nowhere stays as given, so that its reader names it.
    assert str(data_path("no_such_constitution")) == "no_such_constitution"
    with pytest.raises(ValueError, match="constitution file elsewhere/concise.yaml not found"):
        load_constitution("elsewhere/concise.yaml")   # a folder of yours that lacks it: not the bundled one


def test_a_configs_relative_paths_are_its_folders_and_a_name_is_the_bundled_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mine.yaml").write_text((DATA / "constitutions/helpful.yaml").read_text().replace(
        "name: helpful", "name: mine"))
    (project / "p.jsonl").write_text('{"prompt": "Hello?"}\n')
    (project / "config.yaml").write_text("prompts: p.jsonl\nannotate:\n  constitution: mine.yaml\n"
                                         "eval:\n  prompts: heldout\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(project / "config.yaml")
    assert load_constitution(cfg.annotate.constitution).name == "mine"
    assert [p.messages[-1]["content"] for p in load_prompts(cfg.prompts)] == ["Hello?"]
    assert cfg.eval.prompts == "heldout" and load_prompts(cfg.eval.prompts)
    # An override is the caller's: relative to the working folder, as on any command line.
    (tmp_path / "here.jsonl").write_text('{"prompt": "Here?"}\n')
    assert load_config(project / "config.yaml", ["prompts=here.jsonl"]).prompts == "here.jsonl"


def test_an_override_fills_an_optional_section_a_saved_config_left_empty(tmp_path):
    """A run's saved config has `eval: {annotate: null}`; `oaif eval CONFIG eval.annotate.backend=rules`
    must work on it as `oaif run` does on a config without the section."""
    saved = tmp_path / "config.yaml"
    saved.write_text("eval:\n  annotate: null\n")
    cfg = load_config(saved, ["eval.annotate.backend=rules"])
    assert cfg.eval.annotate.backend == "rules"


def test_the_wheel_carries_the_bundled_data(tmp_path):
    """Built as a user's `pip wheel .` builds it, from a copy (the build writes into its source)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "oaif", source / "oaif", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("oaif-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("constitutions", "prompts", "project", "canaries"):
        shipped = {f"oaif/data/{kind}/{p.name}" for p in (DATA / kind).iterdir() if p.is_file()}
        assert shipped and shipped <= names, sorted(shipped - names)


def test_oaif_init_makes_a_project_that_runs_from_its_own_folder(tiny_model, tmp_path):
    r = oaif_main("init", str(tmp_path / "proj"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    project = tmp_path / "proj"
    assert sorted(p.name for p in project.iterdir()) == [".oaif-output", "README.md", "config.yaml",
                                                          "constitution.yaml", "prompts.jsonl", "run.py"]
    again = oaif_main("init", str(project), cwd=tmp_path)   # never over what is there
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    # Its config, from its folder: its constitution and prompts, the tiny model as the policy.
    r = oaif_main("run", "config.yaml", f"policy.model={tiny_model}", "rounds=1", "prompts_per_round=4",
                  cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (project / "runs/my-run/checkpoints/round_000000").is_dir()
    # Its script, with its Python judge, as a user runs it: its own process, from elsewhere.
    r = subprocess.run([sys.executable, str(project / "run.py"), f"policy.model={tiny_model}", "rounds=1",
                        "prompts_per_round=4", "name=py", f"output_dir={tmp_path / 'runs'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs/py/rounds/000000/judgments.jsonl").is_file()
    assert "backend: python" in (tmp_path / "runs/py/config.yaml").read_text()


def test_oaif_constitutions_lists_the_bundled_ones():
    r = oaif_main("constitutions")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == sorted(p.stem for p in (DATA / "constitutions").glob("*.yaml")) and "concise" in names
