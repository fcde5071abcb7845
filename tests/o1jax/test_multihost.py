"""Two CPU processes on loopback run a small self-play round (search and two learner steps) on one global mesh of
8 devices, 4 per process, and agree with one process of 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multihost_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(process_id, num_processes, port, devices, model_dir, workdir, out):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.Popen([sys.executable, WORKER, str(process_id), str(num_processes), str(port), str(devices),
                           model_dir, workdir, out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_equal_one(tmp_path, tiny_smollm2_checkpoint):
  port = free_port()
  shared = str(tmp_path / "two")   # one workdir on a shared file system, as a pod's bucket
  two = [start(i, 2, port, 4, tiny_smollm2_checkpoint, shared, str(tmp_path / "two.npz")) for i in range(2)]
  one = start(0, 1, port, 8, tiny_smollm2_checkpoint, str(tmp_path / "one"), str(tmp_path / "one.npz"))
  for p in two + [one]:
    output, _ = p.communicate(timeout=900)
    assert p.returncode == 0, output[-3000:]
  a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert set(a.files) == set(b.files) and len(a["losses"]) == 2
  np.testing.assert_array_equal(a["tokens"], b["tokens"])          # the same trees
  np.testing.assert_allclose(a["values"], b["values"], atol=1e-5)
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
  for name in a.files:
    if name.startswith("w"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert not os.path.exists(os.path.join(shared, "metrics.jsonl.1"))   # process 1 wrote no files of its own
