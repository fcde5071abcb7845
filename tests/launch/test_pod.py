"""launch/pod.sh --dry-run: the commands it would run on a TPU VM slice, and the pod's jax.distributed start."""

import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLICE = ["--name=o1jax-v5e16", "--zone=us-west4-a", "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
# Arguments that a careless join would split, expand or unquote on the workers.
TRICKY = ["--config.note=a b \"c\"", "--config.who=it's", "--workdir=$HOME/run", "*", "--config.x=`id`", ""]


def pod(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "pod.sh"), *args], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The printed commands as argument lists, each line parsed by bash itself (comment lines left out)."""
  assert result.returncode == 0, result.stderr
  out = []
  for line in result.stdout.splitlines():
    if line.startswith("#") or not line.strip():
      continue
    words = subprocess.run(["bash", "-c", 'eval "set -- $LINE"; printf "%s\\0" "$@"'], env={"LINE": line},
                           capture_output=True, text=True, check=True).stdout
    out.append(words.split("\0")[:-1])
    assert shlex.split(line) == out[-1]
  return out


def remote_command(command: list[str]) -> str:
  [value] = [a.removeprefix("--command=") for a in command if a.startswith("--command=")]
  return value


def app_commands(cmds: list[list[str]]) -> list[list[str]]:
  return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "ssh"
          and "-m launch." in remote_command(c)]


def error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert result.stdout == ""
  return lines[0]


def test_dry_run_creates_copies_installs_and_runs_one_command_on_every_worker():
  cmds = commands(pod(*SLICE, "--project=p1", "--dry-run", "--", "train", "--config=configs/gemma2_2b_gsm8k.py",
                      "--workdir=gs://b/run"))
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  assert all("--zone=us-west4-a" in c and "--project=p1" in c for c in gcloud)
  assert gcloud[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "o1jax-v5e16"]
  assert gcloud[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "o1jax-v5e16"]
  assert "--accelerator-type=v5litepod-16" in gcloud[1] and "--version=v2-alpha-tpuv5-lite" in gcloud[1]
  archive = [c for c in cmds if c[:2] == ["git", "archive"]]
  assert len(archive) == 1 and archive[0][-1] == "HEAD"
  tarball = archive[0][-2].removeprefix("--output=")
  [scp] = [c for c in gcloud if c[4] == "scp"]
  assert scp[5] == tarball and "--worker=all" in scp
  ssh = [c for c in gcloud if c[4] == "ssh"]
  assert all("--worker=all" in c for c in ssh)
  assert "bash launch/install.sh tpu" in remote_command(ssh[-2])
  [app] = app_commands(cmds)
  assert app is cmds[-1]
  words = shlex.split(remote_command(app))
  assert words[:3] == ["cd", "o1jax", "&&"]
  assert words[3:] == ["env", "O1JAX_DISTRIBUTED=auto", ".venv/bin/python", "-m", "launch.train",
                       "--config=configs/gemma2_2b_gsm8k.py", "--workdir=gs://b/run"]


def test_arguments_reach_the_app_unchanged_through_a_real_shell(tmp_path):
  """The workers' shell runs the --command string: run it in a local bash against a stand-in python that writes
  out the arguments it got."""
  app = commands(pod(*SLICE, "--dry-run", "--env=XLA_FLAGS=--a --b", "--", "solve", *TRICKY))[-1]
  python = tmp_path / "o1jax" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\nprintf "%s\\n" "$O1JAX_DISTRIBUTED" "$XLA_FLAGS" > env.txt\n'
                    'for a in "$@"; do printf "%s\\0" "$a"; done > args.bin\n')
  python.chmod(python.stat().st_mode | stat.S_IXUSR)
  subprocess.run(["bash", "-c", remote_command(app)], cwd=tmp_path, check=True, env={"PATH": os.environ["PATH"],
                                                                                      "HOME": "/nowhere"})
  got = (tmp_path / "o1jax" / "args.bin").read_bytes().decode().split("\0")[:-1]
  assert got == ["-m", "launch.solve", *TRICKY]
  assert (tmp_path / "o1jax" / "env.txt").read_text().splitlines() == ["auto", "--a --b"]


def test_clone_mode_setup_and_logs(tmp_path):
  logs = str(tmp_path / "logs")
  cmds = commands(pod(*SLICE, "--repo=https://example.com/o1jax.git", "--ref=v1", "--dir=work/o1jax",
                      "--no-install", "--setup=gcloud storage cp -r gs://b/gemma-2-2b-it checkpoints/",
                      f"--logs={logs}", "--create-arg=--spot", "--dry-run", "--", "train"))
  assert not [c for c in cmds if c[0] == "git" or "scp" in c]
  ssh = [remote_command(c) for c in cmds if "ssh" in c]
  assert "git clone --quiet https://example.com/o1jax.git work/o1jax.new" in ssh[0]
  assert "checkout --quiet v1" in ssh[0] and "mv work/o1jax.new work/o1jax" in ssh[0]
  assert not any("install.sh" in s for s in ssh)
  assert ssh[1] == "cd work/o1jax && gcloud storage cp -r gs://b/gemma-2-2b-it checkpoints/"
  assert "--spot" in [c for c in cmds if "create" in c][0]
  [app] = app_commands(cmds)
  assert f"--output-directory={logs}" in app and "--worker=all" in app
  assert not os.path.exists(logs)        # a dry run makes nothing


@pytest.mark.parametrize("args, expected", [
    (SLICE[1:] + ["--dry-run", "--", "train"], "error: --name is missing; see the options at the top of "
                                               "launch/pod.sh."),
    (SLICE + ["--zone", "--dry-run", "--", "train"], "error: option --zone needs a value: --zone=VALUE."),
    (SLICE + ["--nmae=x", "--", "train"], "error: unknown option --nmae=x before --; expected the options at the "
                                          "top of launch/pod.sh, then -- APP FLAGS."),
    (SLICE + ["--dry-run"], "error: no app given; put the launcher and its flags after --, e.g. -- train "
                            "--config=configs/gemma2_2b_gsm8k.py."),
    (["--name=Bad_Name"] + SLICE[1:] + ["--", "train"], "error: --name=Bad_Name is not a TPU name; expected "
                                                        "lowercase letters, digits and hyphens, starting with a "
                                                        "letter."),
    (SLICE[:2] + ["--accelerator=tpu v5", SLICE[3], "--", "train"], "error: --accelerator='tpu v5' is not an "
                                                                    "accelerator type; expected e.g. v4-8, "
                                                                    "v5litepod-16, v5p-64, v6e-16."),
    (SLICE + ["--env=1X=2", "--", "train"], "error: --env=1X=2 is not NAME=VALUE."),
    (SLICE + ["--ref=no-such-ref", "--", "train"], "error: --ref=no-such-ref is not a commit of this repository."),
])
def test_bad_arguments_give_one_error_line_and_status_2(args, expected):
  assert error_line(pod(*args)) == expected


def test_unknown_app_names_the_launchers():
  line = error_line(pod(*SLICE, "--dry-run", "--", "trian", "--config=x"))
  assert line.startswith("error: unknown app trian; expected one of the launchers in launch/: ")
  assert {"train", "solve", "plan"} <= set(line.removesuffix(".").split(": ")[-1].split())
  assert "app" not in line.split(": ")[-1].split()


# ------------------------------------------------------------------ the pod side: o1jax.parallel.initialize


@pytest.fixture
def distributed_calls(monkeypatch):
  import jax

  from o1jax import parallel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)   # leave this process's collectives alone
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
               "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS", "O1JAX_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  return parallel, calls


def test_pod_environment_starts_jax_distributed_with_no_arguments(distributed_calls, monkeypatch):
  parallel, calls = distributed_calls
  parallel.initialize()
  assert calls == []                      # a plain single-process run starts nothing
  monkeypatch.setenv("O1JAX_DISTRIBUTED", "auto")
  parallel.initialize()
  assert calls == [((), {})]              # JAX reads the TPU VM metadata itself
  parallel.initialize("host0:1234", 2, 1)
  assert calls[-1] == ((), {"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1})


def test_a_bad_distributed_setting_is_one_sentence(distributed_calls, monkeypatch):
  parallel, calls = distributed_calls
  monkeypatch.setenv("O1JAX_DISTRIBUTED", "yes")
  with pytest.raises(ValueError, match=r"^O1JAX_DISTRIBUTED='yes'; expected 'auto' \(let JAX find the cluster"):
    parallel.initialize()
  assert calls == []
