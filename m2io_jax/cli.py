"""The one way every `python -m m2io_jax....` command defines its flags, reads its config and runs.

A command defines its absl flags at module level, declares its `--config` (when it has settings) with
`define_config`, and ends with `cli.run(main)`:

    from absl import flags

    from m2io_jax import cli
    from m2io_jax.data import config as data_config

    _DATASET = flags.DEFINE_string("dataset", None, "dataset name, e.g. recipe (required)")
    _CONFIG = cli.define_config(data_config, "data and retrieval settings")

    def main(argv: Sequence[str]) -> None:
        cli.no_positional_arguments(argv)
        cli.require(_DATASET)                       # not required=True: see `require`
        config = _CONFIG.value                      # an ml_collections.ConfigDict
        if _DATASET.value not in config.datasets:
            raise cli.UserError(f"--dataset={_DATASET.value}: expected one of {config.datasets}")
        ...

    if __name__ == "__main__":
        cli.run(main)

`--config` follows ml_collections `config_flags` (as big_vision does): `--config=configs/x.py` loads
`get_config()` of that file (`--config=configs/x.py:arg` passes `arg` to it), `--config.some.field=value`
overrides one field. Without `--config` the command uses the package's own default config module (the one
given to `define_config`), so an installed package works without the `configs/` folder.

A user's mistake ends the command with one line on stderr, `<command>: error: <what was wrong>`, and a
non-zero exit, never a traceback: an unknown or malformed flag, a missing required flag, a `--config` file
that does not exist, an unknown `--config.x` key (the line names the closest valid keys), a `UserError`
raised by the command (exit 1), a missing input file (`FileNotFoundError`, exit 1). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
import types
from typing import Any, Callable, NoReturn, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_FLAG = "config"
USAGE_EXIT = 2  # a malformed command line
INPUT_EXIT = 1  # a well-formed command whose inputs are wrong (UserError, missing file)

_OVERRIDE_RE = re.compile(rf"^-{{1,2}}(?:no)?{CONFIG_FLAG}\.([^=]+)")
_CONFIG_VALUE_RE = re.compile(rf"^-{{1,2}}{CONFIG_FLAG}(?:=(.*))?$")


class UserError(Exception):
    """A mistake of the person running the command (bad value, unknown name): reported as one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class ConfigHandle:
    """The declared `--config` flag; `.value` is the parsed ConfigDict once `run` has parsed the command line."""

    default_path: str
    help: str
    module: str  # the command module that declared it; `run(main)` defines the flag of main's module only

    @property
    def value(self) -> ml_collections.ConfigDict:
        if CONFIG_FLAG not in flags.FLAGS:
            raise RuntimeError("the --config flag is defined by cli.run: read .value inside main, not at import")
        return flags.FLAGS[CONFIG_FLAG].value


_declared: dict[str, ConfigHandle] = {}


def define_config(default: types.ModuleType, help_text: str) -> ConfigHandle:
    """Declares the command's `--config` flag; `default` is a package module with `get_config()`.

    Each command module declares at most one; importing several commands into one process is fine, since
    `run(main)` defines only the flag of `main`'s module. The flag itself is defined by `run`, so that a wrong
    `--config...` argument is reported as one line
    rather than a traceback at import time (config_flags reads overrides when the flag is defined).
    """
    module = sys._getframe(1).f_globals.get("__name__", "")
    if module in _declared:
        raise RuntimeError(f"{module}: define_config called twice (first default {_declared[module].default_path})")
    if not callable(getattr(default, "get_config", None)):
        raise TypeError(f"{default.__name__} ({default.__file__}) has no get_config(): it cannot be a config default")
    handle = ConfigHandle(default_path=default.__file__, help=help_text, module=module)
    _declared[module] = handle
    return handle


def require(*holders: flags.FlagHolder) -> None:
    """Raises app.UsageError (one line, exit 2) naming each of `holders` that was not given.

    Commands check their required flags here rather than with `required=True`: a module-level validator
    would fail any later in-process parse of the flags once the command is imported as a library.
    """
    missing = [f"--{h.name}" for h in holders if h.value is None]
    if missing:
        raise app.UsageError(f"missing required flags: {', '.join(missing)}")


def no_positional_arguments(argv: Sequence[str]) -> None:
    """Raises app.UsageError (reported as one line, exit 2) when the command line holds arguments that are not flags."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}: every input is a --flag")


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, nested sections and their fields alike (e.g. "retrieval", "retrieval.top_k")."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(config_keys(value, key + "."))
    return keys


def unknown_override_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """None when `key` names a field of `config`; else the error naming it and the closest valid keys."""
    valid = config_keys(config)
    if key in valid:
        return None
    closest = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"closest valid keys: {', '.join(closest)}" if closest else f"valid keys: {', '.join(valid)}"
    return f"--{CONFIG_FLAG}.{key}: no such config key; {hint}"


def load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the Python file `path`; `path` may end in `:arg`, passed on as `get_config(arg)`."""
    file_path, *arg = path.split(":", 1)
    spec = importlib.util.spec_from_file_location(f"{CONFIG_FLAG}_file", file_path)
    if spec is None or spec.loader is None:
        raise UserError(f"--{CONFIG_FLAG}={path}: {file_path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look their module up while it executes
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"--{CONFIG_FLAG}={path}: {file_path} defines no get_config()")
    return module.get_config(*arg)


def _config_path(argv: Sequence[str], default_path: str) -> str:
    """The `--config` value given on `argv` (the last one wins), else `default_path`."""
    path = default_path
    for i, arg in enumerate(argv[1:], start=1):
        match = _CONFIG_VALUE_RE.match(arg)
        if match:
            value = match.group(1)
            path = value if value is not None else (argv[i + 1] if i + 1 < len(argv) else "")
    return path


def _check_config_arguments(argv: Sequence[str], handle: ConfigHandle) -> None:
    """Raises UserError for a missing `--config` file or an unknown `--config.x` key, before config_flags sees them."""
    path = _config_path(argv, handle.default_path)
    file_path = path.split(":", 1)[0]
    if not os.path.isfile(file_path):
        raise UserError(f"--{CONFIG_FLAG}={path}: no such file (expected a Python file with get_config())")
    config = load_config(path)
    for arg in argv[1:]:
        match = _OVERRIDE_RE.match(arg)
        message = match and unknown_override_message(config, match.group(1))
        if message:
            raise UserError(message)


def _program_name(argv: Sequence[str]) -> str:
    return os.path.splitext(os.path.basename(argv[0]))[0] if argv and argv[0] else "m2io_jax"


def _fail(argv: Sequence[str], message: str, code: int) -> NoReturn:
    """Writes `<command>: error: <message>` as one line on stderr and exits with `code`."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{_program_name(argv)}: error: {one_line}\n")
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(argv, str(error), USAGE_EXIT)


def _guarded(main: Callable[[list[str]], Any], argv: Sequence[str]) -> Callable[[list[str]], Any]:
    def guarded_main(args: list[str]) -> Any:
        if not flags.FLAGS["verbosity"].present:  # absl's INFO lines (Orbax logs every save and restore step)
            logging.set_verbosity(logging.WARNING)  # drown the progress lines; --verbosity=0 brings them back
        try:
            return main(args)
        except app.UsageError as error:
            _fail(argv, str(error), USAGE_EXIT)
        except UserError as error:
            _fail(argv, str(error), INPUT_EXIT)
        except FileNotFoundError as error:
            _fail(argv, str(error), INPUT_EXIT)

    return guarded_main


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Defines the declared `--config` flag, parses the command line and runs `main` (wraps `absl.app.run`).

    User mistakes end in one stderr line and a non-zero exit (see the module docstring). absl logs warnings
    and errors only, unless `--verbosity=0` (INFO) is given.
    """
    argv = list(sys.argv if argv is None else argv)
    handle = _declared.get(main.__module__)
    if handle is not None:
        try:
            expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
            _check_config_arguments(expanded, handle)
            config_flags.DEFINE_config_file(CONFIG_FLAG, handle.default_path, handle.help, sys_argv=expanded)
        except UserError as error:
            _fail(argv, str(error), USAGE_EXIT)
        except flags.Error as error:
            _fail(argv, str(error), USAGE_EXIT)
    app.run(_guarded(main, argv), argv=argv, flags_parser=_parse_flags)
