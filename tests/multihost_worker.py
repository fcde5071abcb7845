"""One process of the multi-host test (tests/o1jax/test_multihost.py): a small self-play round on one global mesh.

  python tests/multihost_worker.py <process_id> <num_processes> <port> <devices> <model_dir> <workdir> <out.npz>

Every process runs the same round; process 0 writes the final trainable weights, the learner's losses and the
trees' values to <out.npz>. Run with one process of 8 devices for the reference.
"""

import os
import sys

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
model_dir, workdir, out = sys.argv[5:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
os.chdir(root)

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu(xla_flags.COLLECTIVE_FLAGS)

from o1jax import parallel  # noqa: E402

if num_processes > 1:
  parallel.initialize(f"localhost:{port}", num_processes, process_id)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import smollm2_selfplay  # noqa: E402
from o1jax import selfplay  # noqa: E402

c = smollm2_selfplay.get_config()
c.model.path, c.model.adapter = model_dir, ""
c.lora.rank, c.lora.alpha = 2, 4.0
c.data.problems_per_round, c.rounds = 4, 1
c.mcts.num_simulations = 2
c.sampling.max_new_tokens, c.sampling.max_rows = 8, 8
c.experience.seq_len = 384
c.learner.batch_size, c.learner.steps_per_round, c.learner.accumulate = 8, 2, 1
c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 1

assert jax.device_count() == 8 and jax.process_count() == num_processes
job = selfplay.prepare(c, workdir)
job.run(progress=False)
trainable = parallel.to_host(job.state["trainable"])
if parallel.is_writer():
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [m["loss"] for m in metrics if m["split"] == "train"]
  trees = [json.load(open(os.path.join(workdir, "trees", "round_0", f"{i}.json"))) for i in range(4)]
  values = [n["value"] for t in trees for n in t["nodes"]]
  tokens = [x for t in trees for n in t["nodes"] for x in n["tokens"]]
  np.savez(out, losses=np.asarray(losses), values=np.asarray(values), tokens=np.asarray(tokens),
           **{f"w{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(trainable))})
parallel.shutdown()
print(f"process {process_id} done", flush=True)
