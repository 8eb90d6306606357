"""The LLaMA benchmark step (``minilora bench --model``'s case) with each library alone in a
fresh process, as a user runs it: no other library's threads or allocator state beside it.

``minilora bench --model`` times both libraries in one process, interleaved, which is the fair
way to compare them on a noisy machine, but each then runs on the allocator state the other
one's step left behind (docs/performance.md, "A step alone in its process"). Here each
contender gets its own process, one after another and alternating over ``--rounds``:

    torch             transformers + PEFT
    torch+retain      the same after ``retain_freed_memory()``
    minilora          minilora's model
    minilora+retain   the same after ``retain_freed_memory()`` (what ``minilora demo`` does)

Each process times ``--steps`` steps after a first one and prints the median step and the
median of the minor page faults a step took. Absolute times on a shared machine drift between
processes: read the ratios of one round, and the spread over rounds.

    python benchmarks/step_alone.py [--rounds 2] [--steps 7]
"""

import argparse
import json
import subprocess
import sys

_PROBE = """
import json, resource, sys, time
import torch
from minilora.tools import bench_model as bm
from minilora.toolkit.memory import retain_freed_memory
who, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
case = bm.FULL
tmodel, topt = bm.build_torch(case)
ids = bm._batch(case)
if who.startswith("torch"):
    step = bm.torch_step(tmodel, topt, torch.as_tensor(ids))
else:
    model, opt = bm.build_minilora(tmodel, case)
    del tmodel, topt
    step = bm.minilora_step(model, opt, ids)
if who.endswith("+retain") and not retain_freed_memory():
    sys.exit("this C library's malloc has no mallopt")
step()  # optimizer state and BLAS buffers exist from here on
times, faults = [], []
for _ in range(steps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
median = lambda a: sorted(a)[len(a) // 2]
print(json.dumps({"ms": 1e3 * median(times), "faults": median(faults)}))
"""

WHO = ("torch", "torch+retain", "minilora", "minilora+retain")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args(argv)
    from minilora.tools.bench_model import FULL
    tokens = FULL["batch"] * FULL["seq"]
    print(f"{'round':>5} {'contender':>16} {'step ms':>9} {'faults':>8} {'tok/s':>7} "
          f"{'/ torch':>8}")
    for r in range(args.rounds):
        torch_ms = None
        for who in WHO:
            out = subprocess.run([sys.executable, "-c", _PROBE, who, str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            torch_ms = torch_ms or m["ms"]
            print(f"{r + 1:>5} {who:>16} {m['ms']:9.1f} {m['faults']:8d} "
                  f"{tokens / m['ms'] * 1e3:7.0f} {m['ms'] / torch_ms:8.3f}", flush=True)


if __name__ == "__main__":
    main()
