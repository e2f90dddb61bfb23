"""Models as they come: a policy without a chat template (a base model) is named before
anything starts, with the fix; policy.chat_template makes it usable and travels with it."""

import shutil

from oaif.config import load_config
from oaif.models import load_tokenizer

from conftest import oaif_main


def base_model(tiny_model, tmp_path):
    """The tiny policy as a base model: the same weights and tokenizer, no chat template."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()
    return base


def test_a_base_model_is_refused_up_front_and_the_plain_template_makes_it_run(tiny_model, tmp_path):
    base = base_model(tiny_model, tmp_path)
    common = ["run", "configs/tiny_cpu.yaml", f"policy.model={base}", f"output_dir={tmp_path}", "rounds=1",
              "prompts_per_round=4"]
    r = oaif_main(*common, "name=refused")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "has no chat template" in r.stderr and "policy.chat_template=plain" in r.stderr
    assert not (tmp_path / "refused").exists(), "refused before anything was written"

    r = oaif_main(*common, "name=plain", "policy.chat_template=plain")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_config(tmp_path / "plain/config.yaml").policy.chat_template == "plain"   # a resume keeps it
    saved = load_tokenizer(str(tmp_path / "plain/checkpoints/round_000000/policy"))   # exported with it
    assert saved.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True,
                                     tokenize=False) == "User: Hi?\nAssistant:"
