import re

import pytest
import yaml

from oaif.config import ConfigError, load_config

from conftest import ROOT, oaif_main


def test_bundled_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["train.beta=0.2", "annotate.backend=vllm", "rounds=3"])
    assert cfg.train.beta == 0.2 and cfg.annotate.backend == "vllm" and cfg.rounds == 3
    assert cfg.generate.temperature == 0.9 and cfg.generate.samples_per_prompt == 2


def test_unknown_keys_name_the_path_and_suggest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rat": 1e-3}, "generate": {"temperature": "hot"},
                                    "annotate": {"backend": "gpt"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "train.learning_rat: unknown key (did you mean 'train.learning_rate'?)" in msg
    assert "generate.temperature: expected a number, got 'hot'" in msg
    assert "annotate.backend: 'gpt' is not one of 'rules', 'vllm'" in msg


@pytest.mark.parametrize("override, message", [
    ("generate.temperature=0", "generate.temperature: must be > 0"),
    ("generate.samples_per_prompt=1", "generate.samples_per_prompt: must be even and >= 2"),
    ("generate.samples_per_prompt=3", "samples are paired 0-1, 2-3"),
    ("generate.top_p=0", "generate.top_p: must be in (0, 1], got 0"),
    ("generate.top_p=1.5", "generate.top_p: must be in (0, 1], got 1.5"),
    ("rounds=-1", "rounds: must be > 0, got -1"),
    ("train.batch_size=two", "train.batch_size: expected an integer, got 'two'"),
    ("annotate.max_invalid_rate=1.2", "annotate.max_invalid_rate: must be in [0, 1]"),
    ("train.simpo_gamma=-1", "train.simpo_gamma: must be >= 0 (a target margin), got -1"),
    ("train.reference_batch_size=-1", "train.reference_batch_size: must be >= 0 (0: micro_batch_size), got -1"),
    ("annotate.openai.price_per_mtok_output=-2", "annotate.openai.price_per_mtok_output: must be >= 0, got -2"),
    ("annotate.openai.price_per_mtok=2", "annotate.openai.price_per_mtok: unknown key"),
    ("rounds", "expected key=value"),
])
def test_values_are_checked(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message, applies_to", [
    (["train.loss=ipo", "train.margin_scale=1.0"], "train.margin_scale: applies to dpo, cdpo and soft only, not ipo",
     "soft"),
    (["train.loss=dpo", "train.kto_desirable_weight=2"], "apply to loss kto only, not dpo", "kto"),
    (["train.loss=orpo", "train.simpo_gamma=0.5"], "train.simpo_gamma: applies to loss simpo only, not orpo", "simpo"),
    (["train.loss=kto", "train.ppo_clip=0.3"], "train.ppo_clip: applies to loss rloo only, not kto", "rloo"),
    (["train.loss=simpo", "train.reference_batch_size=16"], "train.reference_batch_size: loss simpo runs no reference "
     "pass; remove it", "dpo"),
])
def test_a_setting_that_would_do_nothing_is_refused(overrides, message, applies_to):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    load_config(None, [overrides[1], f"train.loss={applies_to}"])


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- rounds: 3\n", "the top level must be a mapping of keys"),
    ("rounds: [3\n", "not valid YAML"),
])
def test_a_config_file_that_is_not_a_config(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_labels_the_judge_cannot_read_as_one_token_fail_before_the_run(tiny_model, tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "annotate.backend=transformers", "annotate.labels=[first answer, second answer]")
    assert r.returncode == 2 and "annotate.labels: 'first answer' is not one token" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())


def test_cli_rejects_a_bad_override_before_doing_anything(tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", "train.bta=0.3")
    assert r.returncode == 2
    assert "train.bta: unknown key (did you mean 'train.beta'?)" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cli_names_a_missing_prompt_file(tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", "prompts=nope.jsonl")
    assert r.returncode == 2 and "prompt file nope.jsonl not found (run.prompts)" in r.stderr


def test_the_docs_config_reference_matches_the_code():
    r = oaif_main("config-help", "--markdown")
    assert r.returncode == 0
    assert r.stdout.strip() in (ROOT / "docs/reference/config.md").read_text(), \
        "regenerate docs/reference/config.md's table with: oaif config-help --markdown"


# Repository files a config or its comments point at (commands to run, other configs).
NAMED_FILE = re.compile(r"\b((?:configs|constitutions|prompts)/[\w./-]+\.(?:yaml|jsonl|txt))\b")


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)   # experiments/ too


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_example_config_loads(path, monkeypatch):
    """Every file an example config names exists and loads with oaif's loaders; its rules can judge its prompts."""
    monkeypatch.chdir(ROOT)   # the configs' paths are the checkout's; names are the bundled files
    from oaif.annotate.base import load_template
    from oaif.constitution import load_constitution
    from oaif.datasets_io import load_prompts

    cfg = load_config(path)
    for named in NAMED_FILE.findall(path.read_text()):
        assert (ROOT / named).is_file(), f"{path.name} names {named}, which does not exist"
    # The training judge on the training prompts; the evaluation judge (default: the training one) on eval.prompts.
    for a, prompts in ((cfg.annotate, cfg.prompts), (cfg.eval.annotate or cfg.annotate, cfg.eval.prompts)):
        loaded = load_prompts(prompts)
        members = [(m.backend, m.constitution or a.constitution) for m in a.mix] if a.backend == "mix" else \
            [(a.backend, a.constitution)]
        assert members, f"{path.name}: backend mix without members"
        for backend, constitution_path in members:
            constitution = load_constitution(constitution_path)
            load_template(a.template, constitution)
            if backend == "rules":
                assert constitution.rules, f"{path.name}: the rules backend needs rules in {constitution_path}"
                if any(r.check == "matches_reference" for r in constitution.rules):   # else every pair is invalid
                    assert all(p.references for p in loaded), f"{path.name}: {prompts} lacks references"


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid_for_accelerate(path):
    """accelerate's own loader reads each file; its engine, processes and precision are what its name and README say."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType, constants

    cfg = load_config_from_file(str(path))   # raises on a top-level key accelerate does not know
    assert isinstance(cfg, ClusterConfig) and cfg.num_machines == 1 and cfg.machine_rank == 0
    place, engine = path.stem.split("_")[:2]  # cpu_ddp_2proc -> cpu, ddp; gpu_zero3 -> gpu, zero3
    # DDP is MULTI_GPU on the CPU too: only that launcher starts several processes (see the file's comment).
    assert cfg.distributed_type == {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                                    "zero2": DistributedType.DEEPSPEED, "zero3": DistributedType.DEEPSPEED}[engine]
    if place == "cpu":
        assert cfg.use_cpu and cfg.mixed_precision == "no"
        assert cfg.num_processes == int(re.search(r"(\d+)proc", path.stem).group(1))
    else:
        assert place == "gpu" and not cfg.use_cpu and cfg.mixed_precision == "bf16" and cfg.num_processes == 8
    # accelerate launch copies the nested keys onto its own arguments and ignores the rest: each must be one.
    known = {action.dest for action in launch_command_parser()._actions}
    assert set(cfg.fsdp_config) | set(cfg.deepspeed_config) <= known
    assert bool(cfg.fsdp_config) == (engine == "fsdp") and bool(cfg.deepspeed_config) == engine.startswith("zero")
    if engine == "fsdp":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" in constants.FSDP_AUTO_WRAP_POLICY
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" in constants.FSDP_STATE_DICT_TYPE
        if fsdp.get("fsdp_version", 1) == 2:   # FSDP2 (the CPU one: oaif refuses FSDP1 on CPUs): full shard is this
            assert place == "cpu" and fsdp["fsdp_reshard_after_forward"] is True
        else:
            assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" in constants.FSDP_SHARDING_STRATEGY
            assert fsdp["fsdp_backward_prefetch"] in constants.FSDP_BACKWARD_PREFETCH
    if engine.startswith("zero"):
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(engine[-1])
        assert ds["deepspeed_multinode_launcher"] in constants.DEEPSPEED_MULTINODE_LAUNCHERS
        assert ds.get("zero3_save_16bit_model", False) == (engine == "zero3")   # else get_state_dict raises
    for named in NAMED_FILE.findall(path.read_text()):
        assert (ROOT / named).is_file(), f"{path.name} names {named}, which does not exist"


def test_eval_annotator_inherits_what_it_leaves_out():
    cfg = load_config(ROOT / "configs/smollm2_cpu.yaml")
    assert cfg.eval.annotate.backend == "rules" and cfg.eval.annotate.constitution == "constitutions/correct.yaml"
    assert cfg.eval.annotate.max_prompt_tokens == cfg.annotate.max_prompt_tokens == 1024   # from annotate
    assert cfg.eval.annotate.mix == cfg.annotate.mix
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["eval.annotate.openai.timeout_s=5", "annotate.openai.max_retries=1"])
    assert cfg.eval.annotate.openai.timeout_s == 5 and cfg.eval.annotate.openai.max_retries == 1
    assert load_config(ROOT / "configs/tiny_cpu.yaml").eval.annotate is None   # unset: the training judge
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.annotate.bakend=rules"])
    assert "eval.annotate.bakend: unknown key (did you mean 'eval.annotate.backend'?)" in str(e.value)
    with pytest.raises(ConfigError, match="eval.every: must be >= 0"):
        load_config(None, ["eval.every=-1"])
    with pytest.raises(ConfigError, match=r"eval.annotate.labels: the two labels must differ"):
        load_config(None, ["eval.annotate.labels=[A, A]"])


def test_saved_config_reloads_to_the_same(tmp_path):
    from oaif.config import dump_config

    cfg = load_config(ROOT / "configs/smollm2_cpu.yaml")
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("name", ["", ".", "..", "../..", "a/b", "/tmp/x", "-x", "a b"])
def test_a_run_name_must_be_one_plain_folder(name, tmp_path):
    (tmp_path / "keep.txt").write_text("the user's file")
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", f"name={name}", "overwrite=true")
    assert r.returncode == 2 and "is not a plain folder name" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_only_an_oaif_run_directory(tmp_path):
    from oaif.rundir import RunDirExists, prepare_run_dir

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("not a run")
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=mine", "overwrite=true"])
    with pytest.raises(RunDirExists, match="is not an oaif run directory"):
        prepare_run_dir(cfg)
    assert (user / "notes.txt").is_file()
    run, lock = prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=run"]))
    lock.release()
    (run / "rounds" / "000000").mkdir()
    with pytest.raises(RunDirExists, match="pass name=<new name> or overwrite=true"):
        prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=run"]))
    again, lock = prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=run", "overwrite=true"]))
    lock.release()
    assert again == run and not (run / "rounds" / "000000").exists()
    assert "overwrite" not in (ROOT / "configs/tiny_cpu.yaml").read_text()   # shipped configs never set it
    # A link is never followed: not even to a real run, which stays whole.
    (run / "rounds" / "000000").mkdir()
    (tmp_path / "linked").symlink_to(run)
    with pytest.raises(RunDirExists, match="is not an oaif run directory"):
        prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=linked", "overwrite=true"]))
    assert (tmp_path / "linked").is_symlink() and (run / "rounds" / "000000").is_dir() and (run / "config.yaml").is_file()


def test_a_missing_model_is_named_before_anything_is_written(tiny_model, tmp_path):
    # `nobody-org/nope` reads as a hub id: the hub (unreachable here, or without it) must be asked
    # briefly and the key named; `models/nope` is a hub id too until models/ exists (a fresh clone).
    for model in ("models/nope", str(tmp_path / "nope"), "./nope", "nobody-org/nope"):
        r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}/runs", f"policy.model={model}")
        assert r.returncode == 2 and f"policy.model: model folder '{model}' not found" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}/runs", f"policy.model={tmp_path}")
    assert r.returncode == 2 and "is a folder without config.json" in r.stderr
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}/runs", f"policy.model={tiny_model}",
                 "annotate.backend=vllm", "annotate.model=models/missing-judge")
    assert r.returncode == 2 and "annotate.model: model folder 'models/missing-judge' not found" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_an_empty_prompt_file_is_an_error_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}/runs", f"prompts={empty}")
    assert r.returncode == 2 and r.stderr == f"oaif: error: {empty}: no prompts\n", r.stderr
    assert not (tmp_path / "runs").exists()
