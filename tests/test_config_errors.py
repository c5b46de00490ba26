"""Config mistakes: one ConfigValueError from `validate` naming the field, and on the command
line one paragraph on stderr with exit code 2, before any model is built."""

import os
import subprocess
import sys

import pytest

from uecjax.config import ConfigValueError, base_config, validate

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
