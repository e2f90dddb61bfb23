"""Checkpoints and resume: a resumed trainer continues exactly; `oaif resume` rewinds a run to
a checkpoint, samples from the checkpoint's policy and continues the schedule."""

import random

import torch

from oaif.checkpoint import save_checkpoint
from oaif.config import LoraConfig, PolicyConfig, RunConfig, TrainConfig, dump_config
from oaif.models import load_tokenizer
from oaif.checkpoint import build_trainer
from oaif.records import PreferencePair, read_jsonl

from conftest import oaif_main, untimed, versions_follow_training


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 200) for _ in range(k)]  # noqa: E731
    return [PreferencePair(round=0, policy_version=0, prompt_id=str(i), messages=[], chosen="", rejected="",
                           p_chosen=0.9, prompt_token_ids=ids(6), chosen_token_ids=ids(3) + [2],
                           rejected_token_ids=ids(9) + [2]) for i in range(n)]


def test_resumed_trainer_takes_the_same_next_steps(tiny_model, tmp_path):
    for lora in (False, True):
        train = TrainConfig(learning_rate=1e-3, batch_size=4, micro_batch_size=2, lr_schedule="cosine",
                            warmup_steps=2, lora=LoraConfig(enabled=lora, r=4))
        cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), device="cpu"), train=train)
        tokenizer = load_tokenizer(cfg.policy.model)
        first = build_trainer(cfg, tokenizer.pad_token_id, total_steps=12)
        first.train_round(synthetic_pairs(8, 0))
        checkpoint = save_checkpoint(tmp_path / f"lora{lora}", 0, 1, first, tokenizer)
        resumed = build_trainer(cfg, tokenizer.pad_token_id, total_steps=12, resume_from=checkpoint)
        assert resumed.steps == first.steps == 2
        more = synthetic_pairs(8, 1)
        a, b = first.train_round(more), resumed.train_round(more)
        assert a["train/learning_rate"] == b["train/learning_rate"]
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-6
        pa = dict(first.policy.named_parameters())
        for name, p in resumed.policy.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p, pa[name], atol=1e-6), name


def test_a_longer_run_continues_its_schedule_without_a_jump(tiny_model, tmp_path):
    """Resumed with more rounds (a longer horizon), the rate goes on down from where it was,
    in the same shape; the longer horizon alone would have raised it."""
    for schedule in ("linear", "cosine"):
        cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), device="cpu"),
                        train=TrainConfig(learning_rate=1e-3, batch_size=4, micro_batch_size=4, lr_schedule=schedule))
        tokenizer = load_tokenizer(cfg.policy.model)
        first = build_trainer(cfg, tokenizer.pad_token_id, total_steps=8)
        before = first.train_round(synthetic_pairs(16, 0))["train/learning_rate"]   # 4 of 8 steps
        checkpoint = save_checkpoint(tmp_path / schedule, 0, 1, first, tokenizer)
        longer = build_trainer(cfg, tokenizer.pad_token_id, total_steps=16, resume_from=checkpoint)
        assert longer.scheduler.get_last_lr()[0] == before
        after = [longer.train_round(synthetic_pairs(4, k))["train/learning_rate"] for k in range(12)]
        assert before > after[0] and all(a > b for a, b in zip(after, after[1:11])) and after[-1] == 0.0, after
        again = build_trainer(cfg, tokenizer.pad_token_id, total_steps=16,   # a second resume keeps the anchor
                              resume_from=save_checkpoint(tmp_path / f"{schedule}2", 1, 2, longer, tokenizer))
        assert again.anchor == longer.anchor and again.scheduler.get_last_lr()[0] == after[-1]


def test_resume_rewinds_to_a_checkpoint_then_extends_the_run(tiny_model, tmp_path):
    common = [f"policy.model={tiny_model}", "generate.enforce_eager=true"]
    r = oaif_main("run", "configs/tiny_cpu.yaml", *common, f"output_dir={tmp_path}", "name=res", "rounds=4",
                 "train.checkpoint_every=2", "train.learning_rate=1e-3", "train.lr_schedule=linear")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "res"
    original = read_jsonl(run_dir / "metrics.jsonl")
    records = ("samples", "judgments", "pairs")
    first_time = {(k, name): (run_dir / f"rounds/{k:06d}/{name}.jsonl").read_bytes() for k in (2, 3) for name in records}

    # As if the run had died after round 1's checkpoint: rounds 2-3 are dropped and redone.
    r = oaif_main("resume", str(run_dir), "--checkpoint", str(run_dir / "checkpoints/round_000001"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped what came later: 2 lines of metrics.jsonl, rounds/000002, rounds/000003" in r.stdout
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert versions_follow_training(metrics, 3) == [m["policy_version"] for m in original]
    assert ["startup/seconds" in m for m in metrics] == [True, False, True, False]   # each process's first round
    # The redone rounds are the first run's exactly: the same prompts (the stream goes on where
    # it was), sampled from the checkpoint's policy with the same seeds, judged and trained on
    # alike (steps, learning rate, loss: the optimizer and schedule continue where they were).
    for (k, name), data in first_time.items():
        assert (run_dir / f"rounds/{k:06d}/{name}.jsonl").read_bytes() == data, (k, name)
    assert [untimed(m) for m in metrics[2:]] == [untimed(m) for m in original[2:]]

    # Its linear schedule ended at 0: more rounds would train nothing, which is said, not done.
    r = oaif_main("resume", str(run_dir), "rounds=6")
    assert r.returncode == 2 and "more rounds would train nothing" in r.stderr, r.stderr[-2000:]
    # Extend it by two rounds at a constant rate.
    r = oaif_main("resume", str(run_dir), "rounds=6", "train.lr_schedule=constant")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4, 5]
    assert [m["train/learning_rate"] for m in metrics[4:]] == [1e-3, 1e-3]
    assert (run_dir / "checkpoints/round_000005/trainer.pt").is_file()

    # Nothing left to do, or a move attempted: a clear error and nothing touched.
    r = oaif_main("resume", str(run_dir))
    assert r.returncode == 2 and "rounds 0-5 are done" in r.stderr and "rounds=N" in r.stderr
    r = oaif_main("resume", str(run_dir), "rounds=7", "name=elsewhere")
    assert r.returncode == 2 and "stays in" in r.stderr
    r = oaif_main("resume", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no config.yaml" in r.stderr
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 6


def test_only_the_newest_checkpoints_are_kept(tiny_model, tmp_path):
    cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), device="cpu"))
    tokenizer = load_tokenizer(cfg.policy.model)
    trainer = build_trainer(cfg, tokenizer.pad_token_id, total_steps=4)
    (tmp_path / "checkpoints/round_000007.tmp").mkdir(parents=True)   # an interrupted save: neither counted nor deleted
    for k in range(5):
        save_checkpoint(tmp_path, k, k, trainer, tokenizer, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["round_000003", "round_000004", "round_000007.tmp"]
    save_checkpoint(tmp_path, 5, 5, trainer, tokenizer, keep=0)
    assert len(list((tmp_path / "checkpoints").glob("round_??????"))) == 3


def test_a_resumed_round_takes_its_paid_judgments_from_the_cache(tiny_model, tmp_path):
    """Round 1 redone after a resume from round 0's checkpoint asks the judge nothing: every
    judgment comes from the cache, and the records are the first run's."""
    cache = tmp_path / "cache.jsonl"
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=c",
                 "rounds=2", "prompts_per_round=6", "train.checkpoint_every=1", "annotate.backend=transformers",
                 f"annotate.cache={cache}", "generate.enforce_eager=true")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "c"
    before = read_jsonl(run_dir / "metrics.jsonl")[1]
    judgments = (run_dir / "rounds/000001/judgments.jsonl").read_bytes()
    assert before["annotate/cache_misses"] > 0
    r = oaif_main("resume", str(run_dir), "--checkpoint", str(run_dir / "checkpoints/round_000000"))
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_jsonl(run_dir / "metrics.jsonl")[1]
    assert after["annotate/cache_misses"] == 0 and after["annotate/cache_hits"] == before["annotate/cache_misses"]
    assert (run_dir / "rounds/000001/judgments.jsonl").read_bytes() == judgments


def test_a_full_weight_checkpoint_exports_to_a_plain_model(tiny_model, tmp_path, monkeypatch):
    """`oaif export` of a full-weight checkpoint: a folder from_pretrained loads, holding the
    trained weights (not the base's) and the tokenizer; exactly, in float32, also where
    policy.dtype auto computes in bfloat16."""
    from oaif.models import load_causal_lm

    cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), device="cpu"),
                    train=TrainConfig(learning_rate=1e-2, batch_size=4, micro_batch_size=4))
    tokenizer = load_tokenizer(cfg.policy.model)
    trainer = build_trainer(cfg, tokenizer.pad_token_id, total_steps=2)
    trainer.train_round(synthetic_pairs(4, 0))
    checkpoint = save_checkpoint(tmp_path / "run", 0, 1, trainer, tokenizer)
    dump_config(cfg, tmp_path / "run/config.yaml")   # export reads the run's config (its base model, dtype)
    assert cfg.policy.dtype == "auto"
    monkeypatch.setattr("oaif.models.auto_dtype", lambda: ("bfloat16", "as on a CPU with AMX"))
    r = oaif_main("export", str(checkpoint), "--out", str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr[-2000:]
    exported = load_causal_lm(str(tmp_path / "exported"), "float32", trainable=False).state_dict()
    base = load_causal_lm(str(tiny_model), "float32", trainable=False).state_dict()
    trained = trainer.policy.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert any(not torch.equal(exported[k], base[k]) for k in base)
    assert load_tokenizer(str(tmp_path / "exported")).encode("hello") == tokenizer.encode("hello")


def test_rewind_drops_later_rounds_including_writes_cut_short(tmp_path):
    """Round folders, checkpoints and evaluation files after the checkpoint's round go,
    temp leftovers of interrupted writes included; earlier ones stay."""
    from oaif.rundir import rewind_run_dir

    for rel in ("rounds/000001", "rounds/000002", "checkpoints/round_000001", "checkpoints/round_000002.tmp"):
        (tmp_path / rel).mkdir(parents=True)
    (tmp_path / "eval").mkdir()
    for name in ("round_000001.jsonl", "round_000003.jsonl", "round_000003.jsonl.tmp", "baseline.jsonl"):
        (tmp_path / "eval" / name).write_text("{}\n")
    dropped, foreign = rewind_run_dir(RunConfig(), tmp_path, 1)
    assert foreign == [] and sorted(dropped) == ["checkpoints/round_000002.tmp", "eval/round_000003.jsonl",
                               "eval/round_000003.jsonl.tmp", "rounds/000002"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["baseline.jsonl", "round_000001.jsonl"]
