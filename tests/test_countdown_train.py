"""The countdown task in the training path: warm-up targets, the prepared policy (saved and
reused), config validation, and configs/countdown.py training 2 steps end to end."""

import importlib.util
import json
import os

import pytest

from uecjax import sft
from uecjax.config import ConfigValueError, validate
from uecjax.countdown_model import (SETTINGS_FILE, prepare_countdown_policy, warmup_examples)
from uecjax.data.countdown import countdown_accuracy, countdown_records, parse_expression
from uecjax.tokenizer import char_tokenizer, render_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


def countdown_config():
    spec = importlib.util.spec_from_file_location("countdown_config",
                                                  os.path.join(REPO, "configs", "countdown.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_warmup_examples_correct_on_level_1_only():
    tok = char_tokenizer()
    records = countdown_records("train", 400, seed=0)
    examples = warmup_examples(tok, records, correct_fraction=0.5, samples_per_problem=4, seed=0)
    assert len(examples) == 1600
    correct = {1: [], 2: []}
    for i, (prompt, target) in enumerate(examples):
        r = records[i // 4]
        assert prompt == render_prompt(tok, r.prompt, template="plain", use_chat_template=False)
        assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        text = tok.decode(target[:-1])
        assert sorted(parse_expression(text)[1]) == sorted(r.meta["numbers"])  # each number once
        correct[r.meta["level"]].append(countdown_accuracy(text, r.meta["numbers"], r.meta["target"]))
    level1, level2 = (sum(v) / len(v) for v in (correct[1], correct[2]))
    # 50% correct plus the random attempts' chance successes (~9%) on level 1; chance alone
    # (<1%) on level 2.
    assert 0.45 < level1 < 0.65 and level2 < 0.03, (level1, level2)
    assert warmup_examples(tok, records[:5], correct_fraction=0.5, samples_per_problem=2,
                           seed=0) == warmup_examples(tok, records[:5], correct_fraction=0.5,
                                                      samples_per_problem=2, seed=0)
    with pytest.raises(ValueError, match="correct_fraction=1.5"):
        warmup_examples(tok, records, correct_fraction=1.5, samples_per_problem=1, seed=0)


def test_prepare_countdown_policy_writes_and_reuses(tmp_path, monkeypatch):
    kw = dict(seed=0, model_overrides=TINY, num_train=16, sft_steps=2, batch_size=8, num_val=4)
    model, tok, path = prepare_countdown_policy(str(tmp_path), log=lambda s: None, **kw)
    assert path == os.path.join(str(tmp_path), "countdown_init")
    for f in ("config.json", "model.safetensors", "tokenizer.json", SETTINGS_FILE):
        assert os.path.exists(os.path.join(path, f)), f
    saved = json.load(open(os.path.join(path, SETTINGS_FILE)))
    assert saved["settings"]["correct_levels"] == [1] and saved["settings"]["sft_steps"] == 2
    assert 0.0 <= saved["val_sampled_accuracy"] <= 1.0 and "val_sampled_numbers" in saved

    def no_training(*a, **k):
        raise AssertionError("retrained a policy that should have been reused")

    monkeypatch.setattr(sft, "supervised_warmup", no_training)
    messages = []
    _, tok2, path2 = prepare_countdown_policy(str(tmp_path), log=messages.append, **kw)
    assert path2 == path and any("reusing" in m for m in messages)
    assert tok2.encode("3 5 7 to 22:", add_special_tokens=False) == \
        tok.encode("3 5 7 to 22:", add_special_tokens=False)
    with pytest.raises(AssertionError, match="retrained"):
        prepare_countdown_policy(str(tmp_path), log=lambda s: None,
                                 **{**kw, "correct_fraction": 0.2})


@pytest.mark.parametrize("change,match", [
    # The section is always there (base_config); a config file replacing it by a partial dict
    # (the old style, `c.countdown_data = dict(...)`) drops fields that readers need.
    (lambda c: c.__setattr__("countdown_data", dict(num_train=10, levels=(1,))),
     r"config.countdown_data.heldout_percent: missing \(was the section replaced by a dict "
     r"without \['heldout_percent', 'num_eval', 'seed'\]\?\)"),
    (lambda c: c.countdown_data.__setattr__("heldout_percent", 0),
     "config.countdown_data.heldout_percent=0"),
    (lambda c: c.countdown.__setattr__("correct_fraction", 1.5),
     r"config.countdown.correct_fraction=1.5: must be in \[0, 1\]"),
    (lambda c: c.countdown_data.__setattr__("levels", (1, 3)), "config.countdown_data.levels"),
    (lambda c: c.countdown_data.__setattr__("num_eval", 0), "config.countdown_data.num_eval=0"),
])
def test_config_validation(change, match):
    c = countdown_config()
    validate(c)  # no data or model path needed: the task is embedded
    change(c)
    with pytest.raises(ConfigValueError, match=match):
        validate(c)


def test_config_trains_two_steps(tmp_path):
    from uecjax.loop import train

    c = countdown_config()
    c.countdown_data.num_train, c.countdown_data.num_eval = 32, 4
    c.countdown.update(num_train=16, sft_steps=2, batch_size=8, num_val=0, model_overrides=TINY)
    c.rollout.prompts_per_batch, c.rollout.group_size = 2, 2
    c.rollout.explore_samples = 2
    c.rollout.max_rounds = 2
    c.train.steps = 2
    c.train.eval_every = 0
    c.train.checkpoint_every = 1
    c.train.export_hf = False
    c.eval.num_prompts, c.eval.n, c.eval.batch_prompts = 4, 2, 4
    c.mesh.num_devices = 1  # the suite simulates 8 CPU devices; this run uses one
    summary = train(c, str(tmp_path), log_console=None)
    assert summary["step"] == 2 and "final_pass@1" in summary
    assert os.path.exists(tmp_path / "countdown_init" / SETTINGS_FILE)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # The countdown grader scored the rows (in process): every response is well-formed or not.
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows if "reward" in r)
    assert summary["initial_format"] >= 0.0 and summary["initial_num_prompts"] == 4


def test_eval_records_carry_the_numbers():
    from uecjax.data.countdown import countdown_source
    from uecjax.setup import make_records

    c = countdown_config()
    c.countdown_data.num_eval, c.countdown_data.seed = 5, 3
    records = make_records(c, "test", train=False)
    assert records == list(countdown_source("test", 5, seed=3, levels=(1, 2)))
    assert all(r.answer == " ".join(map(str, r.meta["numbers"])) + f"|{r.meta['target']}"
               for r in records)
