"""Peak RSS of one RGE estimate on a wide MLP at several ``memory_budget`` values (prints JSON).

Each budget runs in a fresh process: ``ModuleOracle(MLP(64, (width, width), 10), memory_budget=...)``, one
``rge(q=64)`` on a batch of 64, then the process's peak resident memory (``ru_maxrss``). ``--source DIR`` runs
another checkout (put first on ``PYTHONPATH``), e.g. the commit before the budget bounded RGE:

    mkdir /tmp/before && git archive 97a709a dz_lightning | tar -x -C /tmp/before
    python -m benchmarks.rge_memory --source /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = '''
import resource, sys, time, torch
import torch.nn.functional as F
import dz_lightning as dz
from dz_lightning.models import MLP
width, budget = int(sys.argv[1]), (None if sys.argv[2] == "default" else int(sys.argv[2]))
torch.manual_seed(0)
model = MLP(64, (width, width), 10)
x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, memory_budget=budget)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
est = dz.rge(oracle, dict(model.named_parameters()), q=64, generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - start
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, est.queries, seconds)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="checkout to run instead of the installed one")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--budgets", nargs="+", default=[str(2**20), str(64 * 2**20), "default"])
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if args.source:
        env["PYTHONPATH"] = os.pathsep.join([str(args.source.resolve()), env.get("PYTHONPATH", "")])
    weights = 64 * args.width + args.width + args.width * args.width + args.width + args.width * 10 + 10
    rows = []
    for budget in args.budgets:
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.width), budget], env=env, capture_output=True,
                             text=True, timeout=1200, cwd=tempfile.gettempdir())  # `-c` puts the cwd first
        if out.returncode != 0:
            rows.append({"budget": budget, "error": out.stderr.strip().splitlines()[-1][:200]})
            continue
        before, peak, queries, seconds = out.stdout.split()
        rows.append({"budget": budget, "peak_rss_mb": round(int(peak) / 1024, 1),
                     "rss_before_estimate_mb": round(int(before) / 1024, 1), "queries": int(queries),
                     "seconds": round(float(seconds), 2)})
    print(json.dumps({"source": str(args.source or "installed"), "width": args.width,
                      "weights_mb": round(weights * 4 / 2**20, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
