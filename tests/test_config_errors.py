"""Config mistakes: one ConfigValueError from `validate` naming the field, and on the command
line one paragraph on stderr with exit code 2, before any model is built."""

import glob
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

from uecjax.config import EMBEDDED_KINDS, ConfigValueError, Derived, base_config, derive, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(**fields):
    c = base_config()
    c.data.kind = "demo"
    with c.unlocked():
        for path, value in fields.items():
            section, name = path.split(".")
            c[section][name] = value
    return c


@pytest.mark.parametrize("fields, message", [
    # RolloutConfig's ValueError, LossConfigError and OptimConfigError, renamed to the field.
    ({"rollout.group_size": 1}, "config.rollout.group_size=1: group advantages need >= 2"),
    ({"loss.beta": -1.0}, "config.loss.beta=-1.0: must be >= 0"),
    ({"loss.gate": "step"}, "config.loss.gate='step': expected one of"),
    ({"optim.b2": 1.5}, "config.optim.b2=1.5: must be in [0, 1)"),
    # Unknown fields (a config file may add any field) and values of the wrong type.
    ({"rollout.group_sze": 4}, "config.rollout.group_sze: RolloutConfig has no such field (did you mean group_size?)"),
    ({"loss.nosuch": 1}, "config.loss.nosuch: LossConfig has no such field"),
    ({"optim.momentum": 0.9}, "config.optim.momentum: OptimConfig has no such field"),
    ({"loss.method": "grpo"}, "config.loss.method: set config.method instead"),
    ({"rollout.top_k": "5"}, "config.rollout.top_k='5': must be of type int"),
    ({"train.updates_per_rollout": 0}, "config.train.updates_per_rollout=0: must be an integer >= 1"),
    ({"train.epochs": -1}, "config.train.epochs=-1: must be an integer >= 1"),
    # 8 prompts x 5 responses = 40 rows do not split into 3 mini-batches.
    ({"train.updates_per_rollout": 3},
     "config.train.updates_per_rollout=3: must divide the rollout batch, "
     "config.rollout.prompts_per_batch * config.rollout.group_size = 8 * 5 = 40 rows"),
])
def test_validate_names_the_field(fields, message):
    with pytest.raises(ConfigValueError) as info:
        validate(demo_config(**fields))
    assert str(info.value).startswith(message), str(info.value)


def test_new_train_fields_default_and_accept_divisors():
    c = base_config()
    assert c.train.updates_per_rollout == 1 and c.train.epochs == 1
    validate(demo_config(**{"train.updates_per_rollout": 4, "train.epochs": 2}))  # 40 rows / 4
    validate(demo_config(**{"train.updates_per_rollout": 40}))


def config_file(name):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_validates(name):
    c = config_file(name)
    embedded = c.data.kind in EMBEDDED_KINDS
    if not embedded and not c.model.path:  # set on the command line (configs/math.py)
        c.model.preset = "qwen2.5-7b"
    validate(c, dry_run=not embedded)  # the embedded tasks need no paths at all
    assert isinstance(derive(c), Derived)


def train_expressions(cfg, frozen=()):
    """The loss, rollout, optimizer configs and update plan as uecjax.train.train builds them."""
    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.rollout import rollout_config
    from uecjax.updates import UpdatePlan

    loss_cfg = loss_config(cfg.method, **cfg.loss.to_dict())
    rollout_cfg = rollout_config(cfg.method, **cfg.rollout.to_dict())
    plan = UpdatePlan(cfg.train.updates_per_rollout, cfg.train.epochs, cfg.seed)
    scheduled = cfg.train.steps * plan.total
    optim = OptimConfig(**{"total_steps": max(scheduled, cfg.optim.warmup_steps + 1),
                           **cfg.optim.to_dict(), "frozen": frozen})
    return loss_cfg, rollout_cfg, optim, plan


@pytest.mark.parametrize("name, changes, frozen", [
    ("demo", {}, ()),
    # Fewer scheduled updates (5 rollouts x 2) than the warm-up: the horizon is warmup + 1.
    ("demo", {"train.steps": 5, "optim.schedule": "warmup_cosine", "seed": 3}, ()),
    ("geo3k", {}, ()),
    ("geo3k", {"train.epochs": 2, "method": "grpo", "model.freeze_vision": True}, ("visual",)),
])
def test_derive_is_what_train_builds(name, changes, frozen):
    c = config_file(name)
    for path, value in changes.items():
        *sections, field = path.split(".")
        node = c
        for section in sections:
            node = node[section]
        node[field] = value
    validate(c, dry_run=True)
    derived = derive(c, frozen=frozen)
    loss_cfg, rollout_cfg, optim, plan = train_expressions(c, frozen)
    assert derived == Derived(loss_cfg=loss_cfg, rollout_cfg=rollout_cfg, optim_cfg=optim, update_plan=plan)
    assert derived.optim_cfg.total_steps == max(c.train.steps * c.train.updates_per_rollout
                                                * c.train.epochs, c.optim.warmup_steps + 1)
    assert derived.optim_cfg.frozen == frozen


def test_derive_names_the_field():
    c = config_file("demo")
    c.optim.b1 = 1.0
    with pytest.raises(ConfigValueError, match=r"^config.optim.b1=1.0: must be in \[0, 1\)"):
        derive(c)


def test_task_sections_default_to_what_the_code_does_without_them():
    """The embedded tasks' sections of base_config hold the values the preparations and the
    record sources use when a field is absent, so adding them changes no run."""
    from uecjax.countdown_model import prepare_countdown_policy
    from uecjax.demo_model import prepare_demo_policy

    c = base_config()
    for section, prepare in (("demo", prepare_demo_policy), ("countdown", prepare_countdown_policy)):
        defaults = {name: p.default for name, p in inspect.signature(prepare).parameters.items()
                    if p.kind is p.KEYWORD_ONLY}
        settings = c[section].to_dict()
        assert settings.pop("model_overrides") == {} and defaults["model_overrides"] is None
        assert settings == {name: defaults[name] for name in settings}, section
        # The rest comes from other fields (setup.load_policy passes them).
        assert set(defaults) - set(settings) - {"model_overrides"} == \
            {"seed", "template", "use_chat_template", "log"} | ({"style"} if section == "demo" else set())
    assert c.demo_data.seed == 0 and c.countdown_data.seed == 0
    assert c.countdown_data.heldout_percent == 20
    # The config files change single fields: their sections stay complete.
    for name, section in (("demo", "demo_data"), ("demo", "demo"),
                          ("countdown", "countdown_data"), ("countdown", "countdown")):
        assert set(config_file(name)[section].keys()) == set(c[section].keys())


@pytest.mark.parametrize("fields, message", [
    ({"demo_data.num_train": 0}, "config.demo_data.num_train=0: must be an integer >= 1"),
    ({"demo_data.num_eval": -2}, "config.demo_data.num_eval=-2: must be an integer >= 1"),
    ({"demo_data.levels": (1, 5)}, "config.demo_data.levels=(1, 5): choose a non-empty tuple from [1, 2, 3, 4]"),
    ({"demo_data.levels": ()}, "config.demo_data.levels=(): choose a non-empty tuple"),
    ({"demo_data.style": "words"}, "config.demo_data.style='words': choose from ('expression', 'word')"),
    ({"demo_data.heldout_percent": 10},
     "config.demo_data.heldout_percent: base_config().demo_data has no such field"),
    ({"demo.slip": 1.5}, "config.demo.slip=1.5: must be in [0, 1]"),
    ({"demo.sft_steps": -1}, "config.demo.sft_steps=-1: must be an integer >= 0"),
    ({"demo.learning_rate": 0.0}, "config.demo.learning_rate=0.0: must be > 0"),
    ({"demo.levels": (0,)}, "config.demo.levels=(0,): choose a non-empty tuple from [1, 2, 3, 4]"),
    ({"demo.target_accuracy": 2.0}, "config.demo.target_accuracy=2.0: must be in [0, 1], or None"),
    ({"demo.sft_step": 3},
     "config.demo.sft_step: prepare_demo_policy has no such field (did you mean sft_steps?)"),
    ({"demo.seed": 3}, "config.demo.seed: set config.demo_data.seed instead"),
    ({"demo.style": "word"}, "config.demo.style: set config.demo_data.style instead"),
    ({"demo.template": "plain"}, "config.demo.template: set config.prompt.template instead"),
    ({"demo.model_overrides": {"hidden_sise": 64}},
     "config.demo.model_overrides.hidden_sise: TextConfig has no such field (did you mean hidden_size?)"),
    ({"demo.model_overrides": {"hidden_size": 64.0}},
     "config.demo.model_overrides.hidden_size=64.0: must be of type int, as its default 128"),
    ({"demo.model_overrides": {"num_key_value_heads": 3}},
     "config.demo.model_overrides: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"demo.model_overrides": {"vocab_size": 10}},
     "config.demo.model_overrides.vocab_size: the character tokenizer sets it"),
    ({"countdown.correct_levels": (3,)}, "config.countdown.correct_levels=(3,): choose a tuple from [1, 2]"),
])
def test_task_sections_name_the_field(fields, message):
    with pytest.raises(ConfigValueError) as info:
        validate(demo_config(**fields))
    assert str(info.value).startswith(message), str(info.value)


def test_a_section_replaced_by_a_partial_dict_is_named():
    c = demo_config()
    c.demo_data = dict(num_train=30, num_eval=4, levels=(1,), style="expression")  # no seed
    with pytest.raises(ConfigValueError, match=r"^config.demo_data.seed: missing .*"
                       r"c.demo_data.update\(...\)"):
        validate(c)
    c = demo_config()
    c.demo.update(slip=0.5, model_overrides=dict(hidden_size=64))  # update keeps the rest
    c.demo_data.update(num_train=30, levels=(1,))
    validate(c)
    assert c.demo.sft_steps == 500 and c.demo_data.seed == 0 and c.demo_data.num_eval == 128
    assert c.demo.model_overrides.to_dict() == {"hidden_size": 64}


BROKEN_CONFIG = "from uecjax.config import base_config\n\ndef get_config():\n    return base_confg()\n"


@pytest.mark.parametrize("module, args, message", [
    ("uecjax.train", ["--config=configs/demo.py", "--config.rollout.group_size=1"],
     "error: config.rollout.group_size=1: group advantages need >= 2"),
    ("uecjax.train", ["--config=configs/demo.py", "--config.nosuch=1"],
     "error: --config.nosuch: config has no field 'nosuch'"),
    ("uecjax.train", ["--config=configs/demo.py", "--config.loss.nosuch=1"],
     "error: --config.loss.nosuch: config.loss has no field 'nosuch'; its fields are ['beta']"),
    ("uecjax.train", ["--config=configs/missing.py"],
     "error: --config=configs/missing.py: no such file"),
    ("uecjax.train", ["--config={broken}"],
     "the config file fails at line 4: NameError: name 'base_confg' is not defined"),
    ("uecjax.evaluate", ["--config=configs/demo.py", "--config.eval.nn=3"],
     "error: --config.eval.nn: config.eval has no field 'nn' (did you mean n?)"),
])
def test_cli_config_mistake_is_one_paragraph_exit_2(tmp_path, module, args, message):
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN_CONFIG)
    args = [a.format(broken=broken) for a in args]
    if module == "uecjax.train":
        args.append(f"--workdir={tmp_path / 'run'}")
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing ran
