"""The judgment cache identifies itself (a header line), refuses a file that is not a cache
untouched, and is shared safely: a run's start-up repair of a torn last line never cuts a
line another run is appending (both hold an flock)."""

import fcntl
import json
import threading
import time

import pytest

from oaif.annotate.base import Answer, Identity, JudgeRequest
from oaif.annotate.cache import CachedAnnotator, read_cache

HEADER = {"oaif_judgment_cache": 1}   # a cache's first line
ROW = {"key": "k1", "p_first": 0.7, "raw": "r", "label_mass": None}


class Inner:
    """A judge that answers at once and counts what reached it."""

    def __init__(self):
        self.identity = Identity("stub", "m", "c", "h", "t")
        self.stats: dict = {}
        self.asked = 0

    def judge(self, requests):
        self.asked += len(requests)
        return [Answer(0.9, "stub") for _ in requests]


def request(text: str) -> JudgeRequest:
    return JudgeRequest([{"role": "user", "content": "q"}], text, "other")


def test_a_new_cache_starts_with_its_header_and_an_old_one_without_it_is_still_read(tmp_path):
    path = tmp_path / "cache.jsonl"
    inner = Inner()
    CachedAnnotator(inner, path, {}).judge([request("a"), request("b")])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == HEADER and len(lines) == 3 and len(read_cache(path)) == 2
    again = CachedAnnotator(inner, path, {})
    again.judge([request("a")])
    assert again.stats["cache_hits"] == 1 and inner.asked == 2

    legacy = tmp_path / "legacy.jsonl"   # written before the header: read, and appended to as it is
    legacy.write_text(json.dumps(ROW) + "\n")
    cached = CachedAnnotator(inner, legacy, {})
    assert "k1" in cached.entries
    cached.judge([request("c")])
    assert json.loads(legacy.read_text().splitlines()[0]) == ROW and len(read_cache(legacy)) == 2


@pytest.mark.parametrize("text", ['{"prompt": "q", "a": "x", "b": "y"}\n{"prompt": "q2", "a"',   # a pair file
                                  "name: run\nrounds: 3",                                          # a YAML file
                                  "just one line, no newline"])
def test_a_file_that_is_not_a_cache_is_refused_untouched(tmp_path, text):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"annotate.cache: {path} is not an oaif judgment cache \(its first line "
                                         rf"is not .*oaif_judgment_cache"):
        CachedAnnotator(Inner(), path, {})
    assert path.read_text() == text


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
    path = tmp_path / "cache.jsonl"
    header = json.dumps(HEADER) + "\n"
    path.write_text(header + json.dumps(ROW) + "\n" + '{"key": "k2", "p_fi')   # a crash mid-append
    assert [r["key"] for r in read_cache(path)] == ["k1"]
    assert path.read_text() == header + json.dumps(ROW) + "\n"   # the next append starts clean
    path.write_text(header + json.dumps(ROW) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"cache.jsonl:3: not a judgment cache row"):
        read_cache(path)
    path.write_text(header[:10])   # the header itself cut short: an empty cache
    assert read_cache(path) == [] and path.read_text() == ""


def test_start_up_never_cuts_a_line_another_run_is_appending(tmp_path):
    """Run A is half-way through appending a line (it holds the lock, as every append does);
    run B starts and reads the cache meanwhile. B waits for A's line instead of cutting it."""
    path = tmp_path / "cache.jsonl"
    CachedAnnotator(Inner(), path, {}).judge([request("a")])
    line = json.dumps({"key": "k2", "p_first": 0.1, "raw": "r2", "label_mass": None}) + "\n"
    with open(path, "ab") as writer:   # run A's handle
        fcntl.flock(writer, fcntl.LOCK_EX)
        writer.write(line[:10].encode())
        writer.flush()
        started: list = []
        b = threading.Thread(target=lambda: started.append(CachedAnnotator(Inner(), path, {})))
        b.start()
        time.sleep(0.5)
        assert b.is_alive() and path.read_text().endswith(line[:10])   # B waits; nothing cut
        writer.write(line[10:].encode())
        writer.flush()
        fcntl.flock(writer, fcntl.LOCK_UN)
    b.join(10)
    assert not b.is_alive() and "k2" in started[0].entries
    assert [r["key"] for r in read_cache(path)][-1] == "k2" and path.read_text().endswith(line)


KEY_SETTINGS = [("annotate.chat_template", "never"), ("annotate.dtype", "bfloat16"), ("annotate.max_prompt_tokens", "512"),
                ("annotate.chain_of_thought", "true"), ("annotate.openai.base_url", "http://127.0.0.1:9/v1"),
                ("annotate.openai.mode", "text"), ("annotate.labels", "[A, B]"), ("annotate.principles", "sample")]


@pytest.mark.parametrize("backend", ["transformers", "openai"])
def test_every_judging_setting_is_part_of_the_cache_key(backend, tiny_model, tmp_path):
    """A cached verdict is reused only by the same judge asked the same way: changing any
    setting that changes what the judge is sent (or how its answer is read) changes the key."""
    from oaif.annotate.backends import build_annotator
    from oaif.config import load_config

    base = [f"policy.model={tiny_model}", f"annotate.backend={backend}", f"annotate.cache={tmp_path / 'cache.jsonl'}",
            "annotate.openai.api_key_env="]
    key = lambda *extra: build_annotator(load_config(None, [*base, *extra])).keys([request("a")])[0]  # noqa: E731
    first = key()
    assert key() == first   # the same judge asked the same way: the same key
    changed = {setting: key(f"{setting}={value}") for setting, value in KEY_SETTINGS}
    assert [s for s, k in changed.items() if k == first] == []
    assert len(set(changed.values())) == len(changed)
