"""Command-line error handling shared by `uecjax.train` and `uecjax.evaluate_cli`.

A user mistake (a bad flag, a missing or broken `--config` file, an unknown config field, a
value the config rejects) ends the process with one paragraph on stderr and exit code 2, not a
traceback. absl's own parser exits 1 on flag errors and lets anything else (ml_collections'
KeyError for an unknown field, a config file's SyntaxError) escape as a traceback; `app.run`
takes `flags_parser=config_flags_parser()` instead (for a flag defined with
`ml_collections.config_flags.DEFINE_config_file`).
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from typing import NoReturn

import ml_collections
from absl import flags

from uecjax import checkpoint as ckpt
from uecjax.config import ConfigValueError
from uecjax.data import DataNotFoundError
from uecjax.models import CheckpointError, ConfigError
from uecjax.objectives.loss_config import LossConfigError
from uecjax.optim import OptimConfigError
from uecjax.parallel.launch import DistributedError
from uecjax.parallel.mesh import ShardingError
from uecjax.tokenizer import TokenizerError
from uecjax.vision_inputs import VisionInputError

USAGE_EXIT_CODE = 2
# Errors that mean a user mistake (bad config value, missing data or checkpoint, a checkpoint
# that does not match): printed as one message, no traceback.
USER_ERRORS = (ConfigValueError, LossConfigError, OptimConfigError, ConfigError, CheckpointError,
               DataNotFoundError, TokenizerError, ckpt.CheckpointNotFoundError,
               ckpt.CheckpointMismatchError, ShardingError, VisionInputError, DistributedError)


def fail(message: str) -> NoReturn:
    """Prints `error: message` and exits with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def config_flags_parser(config_flag: str = "config", example: str = "configs/demo.py"):
    """A `flags_parser` for `absl.app.run`: parses the flags and loads the `--<config_flag>`
    file (required); any failure ends in `fail` with a message naming the flag or field."""
    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
            config = flags.FLAGS[config_flag].value
            if config is not None:
                # ml_collections defers a file that failed to load to its first attribute access.
                config.get("seed")
        except Exception as e:  # noqa: BLE001  (everything here comes from argv or the config file)
            # One line: absl's and ml_collections' messages may span several.
            fail(" ".join(describe_flag_error(e, argv, config_flag).split()))
        if config is None:
            if flags.FLAGS[config_flag].present:
                fail(f"--{config_flag}={_flag_value(argv, config_flag)}: get_config() returned "
                     "None; return the ConfigDict from it")
            fail(f"--{config_flag} is required: pass a config file, e.g. --{config_flag}={example}")
        return rest
    return parse


def describe_flag_error(error: BaseException, argv: list[str], config_flag: str = "config") -> str:
    """One paragraph for an error raised while parsing `argv`: a missing or broken config file,
    an override of a field the config does not have, or a bad flag value."""
    argument = _flag_value(argv, config_flag)
    path = argument.split(":", 1)[0] if argument else None
    root = error
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    if path is not None:
        if not os.path.isfile(path):
            return (f"--{config_flag}={argument}: no such file (from {os.getcwd()}); pass the path "
                    f"of a config file, e.g. --{config_flag}=configs/demo.py")
        line = _line_in(root, path)
        if line is not None:
            return (f"--{config_flag}={argument}: the config file fails at line {line}: "
                    f"{type(root).__name__}: {_message(root)}; fix the file")
        if isinstance(root, OSError):
            return f"--{config_flag}={argument}: cannot load the config file: {root}"
        unknown = _unknown_override(argv, config_flag, argument)
        if unknown:
            return unknown
    return (f"{error if isinstance(error, flags.Error) else f'{type(error).__name__}: {error}'}; "
            f"--helpfull lists the flags")


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of --name=V / --name V / -name=V in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1:]
            elif arg == prefix and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def _line_in(error: BaseException, path: str) -> int | None:
    """The line of the config file at `path` where `error` was raised (the innermost), if any."""
    target = os.path.abspath(path)
    if isinstance(error, SyntaxError) and error.filename \
            and os.path.abspath(error.filename) == target:
        return error.lineno
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == target]
    return frames[-1].lineno if frames else None


def _message(error: BaseException) -> str:
    return error.msg if isinstance(error, SyntaxError) else str(error)


def _unknown_override(argv: list[str], config_flag: str, argument: str) -> str | None:
    """A message for the first `--config.a.b=v` naming a field the config lacks, else None.
    The file is loaded again: ml_collections' error does not say which override failed."""
    try:
        config = flags.FLAGS[config_flag].parser.parse(argument)  # the file's get_config()
        config.get("seed")
    except Exception:  # noqa: BLE001  (then the original error is reported)
        return None
    prefix = f"{config_flag}."
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or not name.startswith(prefix):
            continue
        node, parts = config, name[len(prefix):].split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)):
                break
            if part not in node:
                section = ".".join([config_flag] + parts[:depth])
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1)
                return (f"--{name}: {section} has no field {part!r}"
                        + (f" (did you mean {close[0]}?)" if close else "")
                        + f"; its fields are {fields}. A field must exist in the config file "
                        "(uecjax.config.base_config documents them) to be set from the command line")
            node = node[part]
    return None
