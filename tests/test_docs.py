"""The front door: a short README whose links resolve, and a docs site that builds in strict
mode (every link, anchor and API name resolves) with references that match the code."""

import os
import re
import subprocess
import sys

import oaif

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


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs.yml sets strict and turns every link, anchor and reference problem into a warning,
    so a broken one fails here."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    api = (tmp_path / "site/reference/api/index.html").read_text()
    assert "Loop" in api and "load_config" in api
