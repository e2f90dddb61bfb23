"""`oaif report`: the plots and the HTML page of a real tiny run, the plotted data read back
from the figures, and the page opened in headless Chromium (Debian's `chromium`;
scripts/test.sh installs it when run as root)."""

import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from matplotlib.image import imread

from oaif.records import read_jsonl
from oaif.pipeline.report import PLOTS, make_plots, write_report

from conftest import oaif_main

NAME = "concise"   # the shared run's name (conftest.concise_run)
# Chromium without these waits on connections the closed network never answers.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Text that would run script, add elements or close the page's own tags if it were not escaped.
HOSTILE = ('</div></pre></details><script>document.title="pwned"</script>'
           '<img src=x onerror="document.title=\'pwned\'"><b>bold</b> &amp; "quotes"')


@pytest.fixture(scope="session")
def browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("OAIF_REQUIRE_CHROMIUM") == "1":   # scripts/test.sh as root installed it
            pytest.fail("chromium is not on PATH although scripts/test.sh installed it")
        pytest.skip("chromium not installed: run `bash scripts/test.sh` as root (installs Debian's chromium) "
                    "or `apt-get install chromium`")
    return path


def chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = Path(tmp_path) / f"profile-{len(list(Path(tmp_path).glob('profile-*')))}"   # new and empty each call
    profile.mkdir()
    r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def run_dir(concise_run) -> Path:
    """The 8-round concise run, evaluated after rounds 3 and 7 (the rounds between have no eval/*)."""
    return concise_run[0]


def same_values(drawn: list[float], expected: list) -> bool:
    """A metric drawn per round: the recorded value, or NaN (a gap) where the round lacks it."""
    return len(drawn) == len(expected) and all(
        math.isnan(d) if e is None else d == pytest.approx(e) for d, e in zip(drawn, expected))


def not_blank(png: Path, min_width: int, min_height: int) -> None:
    image = imread(png)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width, (png, image.shape)
    assert image[..., :3].std() > 0.05, f"{png} is (nearly) one colour"


def test_plots_hold_the_runs_metrics(run_dir, tmp_path):
    r = oaif_main("report", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    out = run_dir / "report"
    assert f"report: {out / 'report.html'}" in r.stdout
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    rounds = list(range(8))
    assert [m["round"] for m in metrics] == rounds
    assert any("train/loss" in m for m in metrics) and [("eval/win_rate_vs_ref" in m) for m in metrics] == \
           [False] * 3 + [True] + [False] * 3 + [True], "the run should have trained and been evaluated twice"

    # The run has every plotted metric, so every plot is there, each a real picture.
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.file for p in PLOTS)
    for png in out.glob("*.png"):
        not_blank(png, 600, 250)

    # What each figure holds, read back from its artists: the run's metrics round by round,
    # with NaN (a gap, not 0) on the rounds without an evaluation.
    drawn = make_plots(metrics, tmp_path)
    keys = {s.key for p in PLOTS for _, series in p.panels for s in series}
    billed = {"judge/tokens_per_pair", "judge/cost_per_pair"}   # API judges only: the rules judge bills nothing
    live = {"eval/live_win_rate", "eval/live_train_judge_win_rate"}   # eval.live_prompts is off in this run
    # eval.annotate is not set: no second judge (tests/test_alarms.py draws the training judge's win rate).
    training_judge = {"eval/train_judge_win_rate"}
    assert {k for lines in drawn.values() for k in lines} == keys - billed - live - training_judge
    assert not any(k in m for m in metrics for k in billed | live | training_judge)
    for lines in drawn.values():
        for key, line in lines.items():
            assert line["x"] == rounds
            assert same_values(line["y"], [m.get(key) for m in metrics]), (key, line["y"])
    win = drawn["eval.png"]["eval/win_rate_vs_ref"]
    assert math.isnan(win["y"][0]) and not math.isnan(win["y"][3]) and not math.isnan(win["y"][7])
    assert same_values(win["low"], [m.get("eval/win_rate_ci_low") for m in metrics])
    assert same_values(win["high"], [m.get("eval/win_rate_ci_high") for m in metrics])


def test_missing_metrics_are_gaps_and_absent_plots_are_skipped(tmp_path):
    rows = [{"round": 0, "policy_version": 1, "generate/mean_length": 30.0, "train/loss": 0.69,
             "annotate/order_agreement": 1.0},
            {"round": 1, "policy_version": 1, "generate/mean_length": 25.0, "annotate/order_agreement": None,
             "eval/win_rate_vs_ref": 0.7, "eval/win_rate_ci_low": 0.6, "eval/win_rate_ci_high": 0.9},
            {"round": 2, "policy_version": 2, "generate/mean_length": 20.0, "train/loss": 0.61,
             "annotate/order_agreement": 0.5}]
    drawn = make_plots(rows, tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert sorted(drawn) == files == ["annotator.png", "eval.png", "hacking.png", "length.png", "loss.png"]
    assert list(drawn["hacking.png"]) == ["eval/win_rate_vs_ref", "generate/mean_length"]
    assert same_values(drawn["loss.png"]["train/loss"]["y"], [0.69, None, 0.61])   # no pairs in round 1: a gap
    assert list(drawn["annotator.png"]) == ["annotate/order_agreement"]              # only the series it has
    assert same_values(drawn["annotator.png"]["annotate/order_agreement"]["y"], [1.0, None, 0.5])
    win = drawn["eval.png"]["eval/win_rate_vs_ref"]   # an interval that is not symmetric about the rate
    assert same_values(win["y"], [None, 0.7, None]) and list(drawn["eval.png"]) == ["eval/win_rate_vs_ref"]
    assert same_values(win["low"], [None, 0.6, None]) and same_values(win["high"], [None, 0.9, None])


def test_page_in_headless_chromium(browser, run_dir, tmp_path):
    out = tmp_path / "report"
    r = oaif_main("report", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    page = (out / "report.html").read_text(encoding="utf-8")

    # Self-contained: every image is embedded, nothing is fetched, no script at all.
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert len(links) == len(PLOTS) and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in page and "<link" not in page and "url(" not in page

    dom = chromium(browser, tmp_path, "--dump-dom", (out / "report.html").as_uri()).stdout
    assert f"<title>{NAME} · oaif report</title>" in dom and f"<h1>{NAME}</h1>" in dom
    assert dom.count('src="data:image/png;base64,') == len(PLOTS)
    # The first pair of round 0 is on the page: its responses, as the browser reads them.
    judgment = read_jsonl(run_dir / "rounds/000000/judgments.jsonl")[0]
    samples = read_jsonl(run_dir / "rounds/000000/samples.jsonl")
    for index in (judgment["a"], judgment["b"]):
        text = next(s["text"] for s in samples if s["prompt_id"] == judgment["prompt_id"] and s["index"] == index)
        assert text.strip() and html.escape(text, quote=False) in dom, text
    assert judgment["constitution_hash"] in dom

    shot = tmp_path / "shot.png"
    chromium(browser, tmp_path, "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}",
             (out / "report.html").as_uri())
    not_blank(shot, 1280, 1600)


def test_untrusted_text_is_escaped(browser, run_dir, tmp_path):
    """A response, a prompt, a judge's raw answer and a principle that are HTML are shown as text."""
    copy = tmp_path / NAME
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    round0 = copy / "rounds/000000"
    judgments = read_jsonl(round0 / "judgments.jsonl")
    first = judgments[0]
    first["orders"][0]["raw"] = HOSTILE
    first["principles"] = [HOSTILE]
    samples = read_jsonl(round0 / "samples.jsonl")
    for s in samples:
        if s["prompt_id"] == first["prompt_id"] and s["index"] == first["a"]:
            s["text"], s["messages"] = HOSTILE, [{"role": "user", "content": HOSTILE}]
    for name, rows in (("judgments.jsonl", judgments), ("samples.jsonl", samples)):
        (round0 / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    page = write_report(copy).read_text(encoding="utf-8")
    assert HOSTILE not in page and page.count(html.escape(HOSTILE)) == 4   # prompt, response, raw, principle
    dom = chromium(browser, tmp_path, "--dump-dom", (copy / "report/report.html").as_uri()).stdout
    assert f"<title>{NAME} · oaif report</title>" in dom, "the planted script or onerror ran"
    assert "<script" not in dom and "<b>bold</b>" not in dom and "<img src=\"x\"" not in dom
    assert dom.count(html.escape(HOSTILE, quote=False)) == 4


def test_errors_name_the_folder_and_the_report_is_replaced_whole(tmp_path, monkeypatch):
    r = oaif_main("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and f"run directory {tmp_path / 'nope'} not found" in r.stderr
    r = oaif_main("report", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path} is not a run directory (no config.yaml)" in r.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: tiny\nrounds: 3\n")
    r = oaif_main("report", str(run))
    assert r.returncode == 2 and f"{run / 'metrics.jsonl'}: no rounds recorded yet" in r.stderr
    row = {"round": 0, "policy_version": 0, "pairs_kept": 0, "pairs_dropped": 8, "generate/mean_length": 9.0}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = oaif_main("report", str(run), "--out", str(tmp_path / "mine"), "--overwrite")
    assert r.returncode == 2 and "has no .oaif-output marker (oaif did not write it): it is not an oaif report" \
        in r.stderr and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    # A report that fails half-way leaves the previous one as it was and no temp folder.
    report = write_report(run)
    (report.parent / "stale.png").write_text("from an earlier report")   # one oaif wrote: in its marker
    marker = report.parent / ".oaif-output"
    written = json.loads(marker.read_text())
    marker.write_text(json.dumps({**written, "entries": [*written["entries"], "stale.png"]}))
    before = report.read_text()
    monkeypatch.setattr("oaif.pipeline.report.page", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_report(run)
    assert report.read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl",
                                                                                       "report"]
    monkeypatch.undo()
    write_report(run)   # a whole new report: nothing of the old one is left
    assert sorted(p.name for p in (run / "report").iterdir()) == [".oaif-output", "hacking.png", "length.png",
                                                                  "report.html"]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl", "report"]
