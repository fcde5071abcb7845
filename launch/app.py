"""What every launcher runs instead of `absl.app.run`: a user's mistake gets one line on stderr, not a traceback.

  _CONFIG = app.define_config_file("config", "configs/smollm2_gsm8k.py", "Experiment config file.")
  def main(argv):
    with app.user_errors():        # setup: config checks, reading the model, adapter, checkpoint and data files
      job = prepare(_CONFIG.value)
    job.run()                      # past setup an exception is a bug and keeps its traceback

after `from launch import app`, with `app.run(main)` under `if __name__ == "__main__":` where the launcher called
`absl.app.run(main)`.

Two kinds of user error end the process with one line `error: <sentence>` on stderr and exit status 2 (the
status of a command line error, as argparse uses it):

  - while the flags are parsed (`run`): an unknown flag, a value of the wrong type (`--count=abc`), a config
    file that does not exist or does not load, a `--config.<field>=` override of a field the config lacks or
    with a value of the wrong type;
  - inside `with user_errors():`, the exceptions a library raises at a boundary where a bad input enters
    (`USER_ERRORS`: ValueError and the file errors), each one clear sentence naming the bad value or file.

`fail(sentence)` writes the same line for a launcher's own check.

absl's own parser prints "FATAL Flags parsing error" with usage lines and exits 1; an ml_collections config
file that fails to load surfaces later as a bare OSError, and an override of a missing field as a bare KeyError
while the module is imported. absl logging is set up by `absl.app.run` exactly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

from absl import app as absl_app
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags, config_path

# Flags defined through this module (define_config_file) belong to the launcher that calls it, as --helpshort
# lists them.
flags.disclaim_key_flags()

# Raised by library code where a bad input enters (a config value, a file): a sentence meant for the user.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_STATUS = 2

# Config flags defined by `define_config_file`: name -> the default config file.
_CONFIG_DEFAULTS: dict[str, str] = {}
# The command line `_parse_flags` parses (flag files expanded, config defaults filled in), for ml_collections.
_PARSED_ARGV: list[str] = []

# absl flag types -> what a value of that type looks like, for "expected ..." in a bad-value sentence.
_EXPECTED_VALUE = {"int": "an integer", "float": "a number", "bool": "true or false"}


def fail(message: str) -> NoReturn:
  """Writes `error: <message>` as one line to stderr (lines of a longer message joined) and exits with status 2.

  For a launcher's own check of a command line value that no library call would reject. The process ends at once
  (`os._exit`, after flushing stdout and stderr): a failed read can leave background threads behind (orbax's
  asyncio loop after a damaged checkpoint) that would print tracebacks of their own during a normal shutdown,
  and setup has nothing to clean up.
  """
  line = " ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"
  sys.stderr.write(f"error: {line}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_STATUS)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Turns the `USER_ERRORS` raised inside into `fail(str(error))`; every other exception passes unchanged.

  Wrap a launcher's setup (config checks, reading model, adapter, checkpoint and data files) in it, not the
  whole run: a ValueError deep inside a training step is a bug, and its traceback is what finds it.
  """
  try:
    yield
  except USER_ERRORS as e:
    fail(str(e) or type(e).__name__)


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
  """`ml_collections.config_flags.DEFINE_config_file`, loading the default file when flags are parsed.

  ml_collections loads a default config file, and applies the command line's `--<name>.<field>=` overrides
  to it, while the flag is defined, that is while the launcher module is imported: an override of a field the
  config lacks raises a bare KeyError there, before `run` can catch it. This flag has no default of its own;
  `run` puts `--<name>=<default>` first on the command line when it has no --<name>, so the default file and
  a given one load at the same place, during flag parsing.
  """
  # ml_collections finds the overrides in `sys_argv`, read when the flag is defined (empty then: nothing to
  # apply) and again when it is parsed (by then `_parse_flags` has filled in the command line it parses).
  holder = config_flags.DEFINE_config_file(name, None, help_string, sys_argv=_PARSED_ARGV)
  flags.FLAGS[name].default_as_str = repr(default)  # what --helpfull shows
  _CONFIG_DEFAULTS[name] = default
  return holder


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with the flag parsing described in the module docstring."""
  absl_app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flags_parser: FLAGS(argv) with the config defaults filled in; any failure -> `fail(sentence)`."""
  args = argv
  try:
    args = _with_config_defaults(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))  # --flagfile= too
    _PARSED_ARGV[:] = args
    remaining = flags.FLAGS(args)
  except Exception as e:  # a bad flag (flags.Error), or whatever a config file or an override raised
    fail(_config_problem(args) or _flag_problem(e))
  for name in _CONFIG_DEFAULTS:
    try:
      # A config file that raised OSError while loading (missing, a directory, or a file its get_config
      # opens) becomes a placeholder that raises OSError on any attribute access.
      getattr(flags.FLAGS[name].value, "keys", None)
    except OSError as e:
      fail(_config_problem(args) or f"config file given by --{name} does not load: {e}")
  return remaining


def _with_config_defaults(argv: list[str]) -> list[str]:
  """argv with `--<name>=<default>` right after the program name for each config flag it does not set."""
  missing = [f"--{name}={default}" for name, default in _CONFIG_DEFAULTS.items()
             if _config_argument(argv, name) is None]
  return [argv[0], *missing, *argv[1:]]


def _config_argument(argv: Sequence[str], name: str) -> str | None:
  """The last value of --<name> in argv (`--name=value` or `--name value`), None when absent."""
  value = None
  for i, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _flag_problem(error: Exception) -> str:
  """One sentence for an exception raised while absl parsed the flags."""
  message = str(error).strip().removeprefix("ERROR:: ")  # absl's prefix for a flag file it cannot open
  if isinstance(error, flags.UnrecognizedFlagError):
    suggestion = message.partition("Did you mean: ")[2].rstrip(" ?")
    hint = f" (did you mean --{suggestion}?)" if suggestion else ""
    return f"unknown flag --{error.flagname}{hint}; run with --helpfull to list the flags."
  if isinstance(error, flags.IllegalFlagValueError):
    # absl writes "flag --<name>=<value>: <why>"; a value that does not convert gets the type it should have,
    # not Python's "invalid literal for int() with base 10"; one out of bounds keeps absl's "0 is not a
    # positive integer".
    match = re.match(r"flag --([^=]+)=(.*?): ", message)
    flag = flags.FLAGS[match.group(1)] if match and match.group(1) in flags.FLAGS else None
    expected = _EXPECTED_VALUE.get(flag.parser.flag_type()) if flag is not None else None
    if expected:
      convert = getattr(flag.parser, "convert", flag.parser.parse)  # numbers convert, then check bounds
      try:
        convert(match.group(2))
      except (TypeError, ValueError):
        return f"flag --{match.group(1)}={match.group(2)}: expected {expected}, got {match.group(2)!r}."
    return message.rstrip(".") + "."
  if isinstance(error, flags.Error):
    return message.rstrip(".") + "."
  return f"{type(error).__name__} while parsing the flags: {message}"


def _config_problem(argv: Sequence[str]) -> str | None:
  """What is wrong with a config flag of argv (its file, or one of its overrides), or None when nothing is.

  Loads each config file again on its own, on the error path only, because ml_collections reports a missing
  field as a bare KeyError and a failing get_config as a traceback inside the flag error's text.
  """
  for name in _CONFIG_DEFAULTS:
    argument = _config_argument(argv, name)
    if argument is None:
      continue
    path, _, parameter = argument.partition(":")
    config, problem = _load_config(name, path, parameter)
    if problem is not None:
      return problem
    for override, arg in _overrides(argv, name):
      problem = _override_problem(config, override, name, path, arg)
      if problem is not None:
        return problem
  return None


def _load_config(name: str, path: str, parameter: str) -> tuple[Any, str | None]:
  """(the config that `path`'s get_config(parameter) returns, None) or (None, why it does not load)."""
  expected = "expected a Python file that defines get_config()"
  where = f"config file {path!r} (--{name})"
  if not os.path.exists(path):
    return None, f"{where} does not exist; {expected}."
  if not os.path.isfile(path):
    return None, f"{where} is not a file; {expected}."
  try:
    spec = importlib.util.spec_from_file_location(f"_{name}_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      return None, f"{where} has no get_config() function; {expected}."
    config = module.get_config(*([parameter] if parameter else []))
  except Exception as e:  # the file is the user's: whatever it raises is reported, with its line
    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    at = f" at line {lines[-1]}" if lines else ""
    return None, f"{where} does not load: {type(e).__name__}{at}: {e}."
  return config, None


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """(field path, the argument) of every `--<name>.<field path>[=value]` and `--no<name>.<path>` in argv."""
  found = []
  for arg in argv:
    match = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      found.append((match.group(2), arg))
  return found


def _override_problem(config: Any, override: str, name: str, path: str, arg: str) -> str | None:
  """Why `--<name>.<override>` cannot set a field of `config` (loaded from `path`), or None when it can."""
  try:
    parts = config_path.split(override)
  except ValueError:
    return f"{arg} does not name a config field; expected --{name}.<field>.<field>=<value>."
  node, walked = config, name
  for part in parts:
    if isinstance(node, (config_dict.ConfigDict, Mapping)):
      fields = list(node.keys())
      if part in fields:
        node = node[part]
        walked += f".{part}"
        continue
    elif dataclasses.is_dataclass(node):
      fields = [f.name for f in dataclasses.fields(node)]
      if part in fields:
        node = getattr(node, part)
        walked += f".{part}"
        continue
    else:
      return f"{arg} goes inside {walked}, which holds a {type(node).__name__} value, not fields."
    return (f"{arg} sets a field that config file {path!r} does not have; expected a field of {walked}: "
            f"{', '.join(sorted(map(str, fields)))}.")
  return None
