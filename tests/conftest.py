import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny policy, built once per test session through the real command."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, "-m", "oaif.cli", "init-tiny", str(out)], check=True, cwd=ROOT)
    return out


def run_oaif(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`oaif ...` as a user runs it: a separate process, output captured."""
    return subprocess.run([sys.executable, "-m", "oaif.cli", *args], cwd=cwd, capture_output=True, text=True)
