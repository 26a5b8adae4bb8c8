"""What the command-line entry points (main, sample, evaluate) share: flag parsing with
one-line errors, ``--config.KEY=VALUE`` overrides on a workdir's saved config, and the
uniform ``error: ...`` exit.

Bad input never reaches the user as a traceback: it is one line on stderr, exit code 2.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import sys
import traceback
from typing import Callable, NoReturn

from absl import flags

from diffusion_jax.runtime import setup_logging
from diffusion_jax.workdir import ConfigError, check_keys

CONFIG_PREFIX = "--config."
USAGE_EXIT_CODE = 2


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``flag_values(argv)`` with a one-line error for a bad flag or a bad ``--config``
    override (unknown key or wrong type) instead of absl's / ml_collections' traceback."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        # absl wraps errors raised while parsing a flag; the cause names the bad key
        cause = e.__cause__ or e.__context__ or e
        fail(
            f"bad command-line flag: {e} ({type(cause).__name__}: {cause}). Config keys are "
            "declared in configs/base.py; check the spelling and type."
        )
    except (AttributeError, KeyError) as e:
        text = str(e.args[0] if e.args else e)
        key = re.search(r"'(\w+)", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        fail(
            f"unknown config key {key.group(1) if key else text!r} in a --config override"
            f"{f' (did you mean {hint.group(1)!r}?)' if hint else ''}. Config keys are "
            "declared in configs/base.py; check the spelling."
        )


def run(main: Callable[[dict], object], flag_values: flags.FlagValues, doc: str, argv=None):
    """Entry point of a CLI that reads a workdir (sample, evaluate): ``--config.KEY=VALUE``
    overrides are split off, the other arguments parsed into ``flag_values`` (its own
    FlagValues, so the CLIs can be imported side by side) with one-line errors; ``--help``
    prints ``doc`` and the flags; ``--verbosity=N`` (absl levels: 0 INFO, 1 DEBUG) shows the
    libraries' logs. Then ``main(overrides)``."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(doc + "\n" + flag_values.get_help())
        sys.exit(0)
    if "verbosity" not in flag_values:
        flags.DEFINE_integer(
            "verbosity",
            None,
            "Library log level (absl: 0 INFO, 1 DEBUG; default: warnings only).",
            flag_values=flag_values,
        )
    rest, overrides = split_config_overrides(argv)
    extra = parse_flags(rest, flag_values)
    if len(extra) > 1:
        fail(f"unexpected arguments {extra[1:]}; see --help")
    if not flags.FLAGS.is_parsed():  # absl logging and grain read the global flags
        flags.FLAGS.mark_as_parsed()
    setup_logging(flag_values.verbosity)
    return main(overrides)


def split_config_overrides(argv) -> tuple[list[str], dict[str, str]]:
    """``argv`` -> (the other arguments, {"sampler.num_steps": "20", ...}) for the CLIs that
    read a workdir's config.json rather than a config file."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith(CONFIG_PREFIX):
            key, sep, value = arg[len(CONFIG_PREFIX) :].partition("=")
            if not sep:
                fail(f"{arg}: config overrides take the form --config.KEY=VALUE")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


_KINDS = {int: "an integer", float: "a number", tuple: "a tuple such as (1, 2)"}


def _parse_value(key: str, text: str, current):
    """CLI text -> a value of ``current``'s type (bool, int, float, str, tuple)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, str):
        return text
    kind = _KINDS.get(type(current), "a Python literal")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}={text}: expected {kind}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}={text}: expected {kind}")
    return value


def apply_overrides(config, overrides: dict) -> None:
    """Set dotted ``overrides`` ({"sampler.num_steps": 20 or "20"}) on ``config`` in place.
    Strings are parsed to the existing value's type; keys must exist (ConfigError naming
    the closest valid key otherwise)."""
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = config
        for i, part in enumerate(sections + [name]):
            if not hasattr(node, "keys") or part not in node:
                valid = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, valid, n=1)
                where = ".".join(sections[:i]) or "the config"
                raise ConfigError(
                    f"unknown config key {key!r}: {where} has no {part!r}"
                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; keys are declared "
                    "in configs/base.py"
                )
            if i < len(sections):
                node = node[part]
        current = node[name]
        if isinstance(value, str):
            value = _parse_value(key, value, current)
        node[name] = value


def load_config_file(path: str):
    """``get_config()`` of a config file (``FILE.py`` or ``FILE.py:ARG``, passed on as
    ``get_config(ARG)``), with its keys checked against configs/base.py. Every problem is
    one ConfigError naming the file (and the line, for an error inside it): a missing file,
    a syntax error, an exception while building the config, an undeclared key."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"--config={path}: no such file (config files live in configs/)")
    name = "_diffusion_jax_config_" + re.sub(r"\W", "_", os.path.basename(file))
    try:
        loader = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config={path}: the file defines no get_config()")
        config = module.get_config(*([arg] if arg else []))
        check_keys(config)
    except SyntaxError as e:
        raise ConfigError(f"--config={path}: syntax error at line {e.lineno}: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"--config={path}: {e}") from None
    except Exception as e:
        where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
        at = f" at line {where[-1].lineno}" if where else ""
        raise ConfigError(f"--config={path}{at}: {type(e).__name__}: {e}") from None
    return config
