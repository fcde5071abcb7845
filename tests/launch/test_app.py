"""The launchers as a user runs them: a mistake on the command line or in an input file gets one line on stderr
(`error: ...`) and exit status 2, no traceback; past setup an exception keeps its traceback."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# absl's log prefix: severity letter, MMDD, time (e.g. "W1201 12:00:00.000000 ..."), which XLA's C++ logging
# shares. Such lines are not the error and are left out before counting lines.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def _launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a user error leaves on stderr, after checking the exit status and that it is alone."""
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: "), lines[0]
  return lines[0]


@pytest.fixture
def corrupt_adapter(tmp_path):
  path = tmp_path / "corrupt.safetensors"
  path.write_bytes(bytes(range(256)) * 8)   # the first 8 bytes say the header is 0x0706050403020100 bytes long
  return str(path)


@pytest.fixture
def broken_config(tmp_path):
  path = tmp_path / "broken_config.py"
  path.write_text("import ml_collections\n\n\ndef get_config():\n  return ml_collections.ConfigDict(steps)\n")
  return str(path)


@pytest.mark.parametrize("args, expected", [
    (["launch.evaluate_format", "--nope=1"], "unknown flag --nope; run with --helpfull to list the flags."),
    (["launch.evaluate_format", "--count=abc"], "flag --count=abc: expected an integer, got 'abc'."),
    (["launch.evaluate_format", "--count=0"], "flag --count=0: 0 is not a positive integer."),
    (["launch.pretrain", "--config=configs/nope.py"],
     "config file 'configs/nope.py' (--config) does not exist; expected a Python file that defines get_config()."),
    (["launch.pretrain", "--config.train.nonexistent=1"],
     "--config.train.nonexistent=1 sets a field that config file 'configs/smollm2_format_pretrain.py' does not "
     "have; expected a field of config.train: frozen_layers, init_adapter, log_every, loss, seed, steps."),
    (["launch.pretrain", "--config=configs/smollm2_format_pretrain.py", "--config.trian.steps=1"],
     "--config.trian.steps=1 sets a field that config file 'configs/smollm2_format_pretrain.py' does not have; "
     "expected a field of config: checkpoint, data, eval, lora, model, optimizer, output, train."),
    (["launch.pretrain", "--config.train.steps=ten"], "flag --config.train.steps=ten: expected an integer, got 'ten'."),
], ids=["unknown_flag", "not_an_integer", "out_of_bounds", "missing_config_file", "missing_field", "missing_group",
        "override_of_wrong_type"])
def test_command_line_errors(args, expected):
  assert _error_line(_launch("-m", *args)) == f"error: {expected}"


def test_config_file_that_fails_to_load(broken_config):
  line = _error_line(_launch("-m", "launch.pretrain", f"--config={broken_config}"))
  assert line == (f"error: config file {broken_config!r} (--config) does not load: NameError at line 5: name "
                  "'steps' is not defined.")


def test_missing_adapter(tmp_path):
  missing = str(tmp_path / "missing.safetensors")
  line = _error_line(_launch("-m", "launch.evaluate_format", f"--adapter={missing}"))
  assert line == f"error: adapter {missing!r} does not exist; run launch.pretrain to make one."


def test_corrupt_adapter(corrupt_adapter):
  line = _error_line(_launch("-m", "launch.evaluate_format", f"--adapter={corrupt_adapter}"))
  assert line == (f"error: LoRA adapter file {corrupt_adapter!r} is not a valid safetensors file (header too "
                  "large); expected a LoRA adapter written by launch.pretrain (o1jax.adapter.write).")


def test_config_value_from_library_code_is_a_user_error():
  """A value the config flag accepts (any string) and the library rejects while preparing the run."""
  line = _error_line(_launch("-m", "launch.pretrain", "--config.train.loss=value"))
  assert line == "error: train.loss='value'; expected 'next_token' or 'rating'."


# A launcher in miniature: the config default and its overrides reach main; user_errors covers setup only.
_LAUNCHER = textwrap.dedent("""
    from absl import logging
    from launch import app

    _CONFIG = app.define_config_file("config", "configs/smollm2_format_pretrain.py", "Experiment config file.")

    def main(argv):
      config = _CONFIG.value
      logging.warning("steps %d", config.train.steps)
      with app.user_errors():
        if config.train.steps == 13:
          raise FileNotFoundError("step file 13 does not exist;\\nexpected another number.")
        if config.train.steps == 98:
          raise RuntimeError("a bug during setup")
      if config.train.steps == 99:
        raise ValueError("a bug after setup")
      print(config.train.steps, config.data.batch_size, config.model.path)

    app.run(main)
    """)


def test_overrides_reach_main_and_logging_still_works():
  result = _launch("-c", _LAUNCHER, "--config.train.steps=7", "--config.data.batch_size=4")
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["7", "4", "smollm2-135m-instruct"]
  assert re.search(r"^W\d{4} .*\] steps 7$", result.stderr, re.MULTILINE), result.stderr


def test_user_errors_joins_a_message_into_one_line():
  line = _error_line(_launch("-c", _LAUNCHER, "--config.train.steps=13"))
  assert line == "error: step file 13 does not exist; expected another number."


@pytest.mark.parametrize("steps, error", [(98, "RuntimeError: a bug during setup"),
                                          (99, "ValueError: a bug after setup")])
def test_bugs_keep_their_traceback(steps, error):
  """Not a user error (a RuntimeError inside user_errors), or past setup (a ValueError after it)."""
  result = _launch("-c", _LAUNCHER, f"--config.train.steps={steps}")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and error in result.stderr, result.stderr


def test_help_lists_the_config_flag_under_the_launcher():
  result = _launch("-m", "launch.pretrain", "--helpshort")
  assert "launch/pretrain.py:\n  --config: Experiment config file.\n    (default: " \
         "'configs/smollm2_format_pretrain.py')" in result.stdout, result.stdout
