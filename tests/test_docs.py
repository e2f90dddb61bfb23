"""The front door: a short README whose links resolve, and a docs site that builds in strict
mode (every link, anchor and API name resolves) with references that match the code."""

import os
import re
import shlex
import subprocess
import sys

import pytest

import oaif
from oaif.bundled import DATA
from oaif.cli import parser
from oaif.config import dump_config, load_config

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 300, "the README is the front door: move detail into docs/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_api_reference_documents_every_public_name():
    page = (ROOT / "docs/reference/api.md").read_text()
    documented = re.findall(r"^::: oaif\.(\w+)$", page, re.M)
    assert sorted(documented) == sorted(oaif.__all__)


def test_the_command_line_reference_matches_the_parser():
    r = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs.yml sets strict and turns every link, anchor and reference problem into a warning,
    so a broken one fails here."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    api = (tmp_path / "site/reference/api/index.html").read_text()
    assert "Loop" in api and "load_config" in api


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `oaif ...` command in the README's and the docs' shell blocks."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").split("\n"):
                if not re.search(r"(^|&&|;)\s*(\.venv/bin/)?oaif\s", line):
                    continue   # another program's line (it may hold a multi-line quote)
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)   # '#' starts a comment
                lexer.whitespace_split = True
                words, command = list(lexer), []
                for word in words + [";"]:
                    if word in ("&&", ";", "|", "||"):
                        if command and command[0] in ("oaif", ".venv/bin/oaif"):
                            found.append((f"{page.relative_to(ROOT)}: {' '.join(command)}", command[1:]))
                        command = []
                    else:
                        command.append(word)
    return found


DOCUMENTED = documented_commands()


@pytest.mark.parametrize("where, argv", DOCUMENTED, ids=[w for w, _ in DOCUMENTED])
def test_every_documented_command_parses_and_its_config_loads(where, argv, tmp_path):
    """Each command the README and the docs show is a real subcommand with real flags, and its
    config with its overrides loads: a bundled or checkout config as it is, a run's saved
    config (runs/NAME/config.yaml) as a run saves one, an `oaif init` project's as init writes it.
    (Not run: most need a model, a judge or a run that the page makes first.)"""
    args = parser().parse_args(argv)   # an unknown subcommand or flag exits here
    config = getattr(args, "config", None)
    if config is None:
        return
    if (ROOT / config).is_file():
        source = ROOT / config
    elif config.startswith("runs/"):
        source = tmp_path / "config.yaml"
        dump_config(load_config(ROOT / "configs/tiny_cpu.yaml"), source)   # what a run saves: every key
    else:
        assert config == "config.yaml", f"{where}: which config is {config}?"
        source = DATA / "project/config.yaml"
    load_config(source, args.overrides)


RUNNABLE = [(page, code) for page in sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
            for code in re.findall(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", page.read_text(), re.S)]


@pytest.mark.parametrize("page, code", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p, _ in RUNNABLE])
def test_the_snippets_marked_runnable_run(page, code, tiny_model, tmp_path):
    """As a reader runs them: a Python process in a folder of theirs with the checkout's configs
    and a built tiny model beside them."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/tiny").symlink_to(tiny_model)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def test_some_snippets_are_marked_runnable():
    assert RUNNABLE
