"""policy.dtype: 'auto' picks bfloat16 where the hardware computes it natively, float32
elsewhere; the rule is fed flag sets here, so it is checked on any CPU. bfloat16 training
keeps the loss curve within a stated tolerance of float32's."""

import random

import pytest
import torch

from oaif.config import PolicyConfig, RunConfig, TrainConfig
from oaif.models import auto_dtype, choose_dtype, cpu_flags, dtype_line, resolve_dtype
from oaif.records import PreferencePair, read_jsonl

from conftest import oaif_main

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("cuda_bf16, flags, dtype", [
    (None, SAPPHIRE_RAPIDS, "bfloat16"),
    (None, {"amx_bf16", "amx_tile"}, "bfloat16"),   # AMX decides alone
    (None, ZEN4, "bfloat16"),
    (None, AVX2_ONLY, "float32"),
    (None, {"avx512f", "avx512_vnni"}, "float32"),   # AVX-512 without its bf16 instructions
    (None, set(), "float32"),                        # no flags known (not Linux, or ARM)
    (True, AVX2_ONLY, "bfloat16"),                   # a GPU decides, not the host's CPU
    (False, SAPPHIRE_RAPIDS, "float32"),
])
def test_auto_picks_bfloat16_only_where_the_device_computes_it(cuda_bf16, flags, dtype):
    chosen, why = choose_dtype(cuda_bf16, frozenset(flags))
    assert chosen == dtype and why


def test_cpu_flags_are_read_from_the_first_flags_line():
    cpuinfo = ("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
               "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == frozenset()   # ARM: not read


def test_an_explicit_dtype_wins_over_the_machine(monkeypatch):
    monkeypatch.setattr("oaif.models.auto_dtype", lambda: ("bfloat16", "the CPU has AMX (amx_bf16)"))
    assert [resolve_dtype(d) for d in ("float32", "bfloat16", "float16", "auto")] == \
        ["float32", "bfloat16", "float16", "bfloat16"]
    assert dtype_line("auto") == "precision: bfloat16 (policy.dtype auto: the CPU has AMX (amx_bf16))"
    assert dtype_line("float32") == "precision: float32 (policy.dtype)"
    assert PolicyConfig().dtype == "auto"


def test_an_auto_run_says_what_it_chose_and_records_it(tiny_model, tmp_path):
    """A real run with policy.dtype=auto prints the choice and its reason before round 0 and
    records the dtype in its first round's metrics (startup/dtype); its config.yaml keeps
    'auto', so a resume decides again on the machine it runs on."""
    dtype, why = auto_dtype()
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                  "name=auto", "policy.dtype=auto", "rounds=1", "prompts_per_round=4", "generate.enforce_eager=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"precision: {dtype} (policy.dtype auto: {why})" in r.stdout, r.stdout
    [metrics] = read_jsonl(tmp_path / "auto/metrics.jsonl")
    assert metrics["startup/dtype"] == dtype
    assert "dtype: auto" in (tmp_path / "auto/config.yaml").read_text()


BF16_LOSS_TOLERANCE = 0.02   # per step, on a DPO loss that falls from log 2 ≈ 0.69 to ~0.02


def test_bfloat16_training_follows_the_float32_loss_curve(tiny_model):
    """The same trainer, pairs and start in float32 and in bfloat16 (a bf16 reference and
    forward passes, fp32 master weights): ten DPO steps at lr 1e-5 take the loss from log 2 to
    near 0, and every step's loss stays within BF16_LOSS_TOLERANCE of float32's (measured:
    0.005 at most; bench/results/dtype.md has the curves)."""
    from oaif.checkpoint import build_trainer

    rng = random.Random(0)
    ids = lambda n: [rng.randrange(4, 256) for _ in range(n)]   # noqa: E731 (the tiny vocabulary, past its special tokens)
    pairs = [PreferencePair(0, 0, str(i), [], "", "", 1.0, ids(32), ids(64), ids(64)) for i in range(8)]
    curves = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), dtype=dtype),
                        train=TrainConfig(learning_rate=1e-5, batch_size=8, micro_batch_size=8))
        trainer = build_trainer(cfg, pad_id=0, total_steps=10)
        curves[dtype] = [trainer.train_round(pairs)["train/loss"] for _ in range(10)]
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert fp32[0] == pytest.approx(0.6931, abs=1e-3) and fp32[-1] < 0.1, fp32   # the curve moves
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < BF16_LOSS_TOLERANCE, (fp32, bf16)


@pytest.mark.parametrize("machine", ["bfloat16", "float32"])
def test_a_cached_judgment_is_keyed_by_the_dtype_auto_resolves_to(machine, tiny_model, tmp_path, monkeypatch):
    """annotate.dtype auto judges in this machine's choice, so the cache keys it by that
    choice: its verdicts are reused by an explicit run of the same dtype, not of the other."""
    from oaif.annotate.backends import build_annotator
    from oaif.annotate.base import JudgeRequest
    from oaif.config import load_config

    monkeypatch.setattr("oaif.models.auto_dtype", lambda: (machine, "a test's machine"))
    base = [f"policy.model={tiny_model}", "annotate.backend=transformers", f"annotate.cache={tmp_path / 'c.jsonl'}"]
    request = JudgeRequest([{"role": "user", "content": "Hi"}], "a", "b")
    key = lambda dtype: build_annotator(load_config(None, [*base, f"annotate.dtype={dtype}"])).keys([request])[0]  # noqa: E731
    other = "float32" if machine == "bfloat16" else "bfloat16"
    assert key("auto") == key(machine) != key(other)


def test_vllm_is_given_the_resolved_dtype_never_auto(monkeypatch):
    """vLLM reads dtype 'auto' as the checkpoint's own dtype (float32 for the tiny policy), not
    as the hardware's choice: build_llm hands it the dtype auto resolved to."""
    import vllm

    from oaif.engine.vllm import build_llm

    class Built(Exception):
        pass

    def fake_llm(**kwargs):   # stands in for vllm.LLM: record the dtype, build nothing
        raise Built(kwargs["dtype"])

    monkeypatch.setattr("oaif.models.auto_dtype", lambda: ("bfloat16", "a test's machine"))
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(Built) as built:
        build_llm("models/tiny", "auto", seed=0, kv_cache_gib=1, max_model_len=64)
    assert built.value.args == ("bfloat16",)
