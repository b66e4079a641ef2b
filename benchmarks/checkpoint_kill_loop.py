"""SIGKILL during checkpoint saves: how many intact checkpoints are refused afterwards (prints JSON).

A child process saves a checkpoint of ``--mb`` MB through ``SafeCheckpointIO`` over and over; the parent kills it
(SIGKILL) at a random moment, then loads the file as ``dz`` would. Each of the ``--runs`` kills is counted as:
``loaded`` (the load verified and returned a checkpoint), ``refused_intact`` (the load refused a file that
``torch.load`` reads whole, with one of the values the child wrote: nothing was wrong with it) or ``refused_damaged``;
``temporaries_left`` counts the ``.tmp`` files beside it after the next save (the dead writer's leftovers).
``killed_at_each_rename`` kills a save (``os._exit`` in a forked process, no cleanup) just before and just after
each of its ``os.replace`` calls, then loads. ``--source DIR`` runs another checkout (put first on ``PYTHONPATH``),
e.g. the commit before the fix:

    mkdir /tmp/before && git archive 97a709a dz_lightning | tar -x -C /tmp/before
    python -m benchmarks.checkpoint_kill_loop --source /tmp/before > before.json
    python -m benchmarks.checkpoint_kill_loop > after.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = '''
import sys, torch
from dz_lightning.checkpointing import SafeCheckpointIO
path, n = sys.argv[1], int(sys.argv[2])
io = SafeCheckpointIO()
step = 0
while True:
    io.save_checkpoint({"step": step, "w": torch.full((n,), float(step))}, path)
    if step == 0:
        print("ready", flush=True)
    step += 1
'''

SWEEP = '''
import json, os, sys, tempfile, torch
from pathlib import Path
from dz_lightning.checkpointing import CorruptCheckpointError, SafeCheckpointIO
results = []
for call in (1, 2, 3):
    for after in (False, True):
        folder = Path(tempfile.mkdtemp(prefix="dz-sweep-"))
        path = folder / "last.ckpt"
        SafeCheckpointIO().save_checkpoint({"step": 1, "w": torch.full((1000,), 1.0)}, path)
        pid = os.fork()
        if pid == 0:
            real, count = os.replace, [0]
            def replace(src, dst):
                count[0] += 1
                if count[0] == call and not after:
                    os._exit(9)
                real(src, dst)
                if count[0] == call:
                    os._exit(9)
            os.replace = replace
            SafeCheckpointIO().save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, path)
            os._exit(0)
        os.waitpid(pid, 0)
        try:
            verdict = f"loaded step {SafeCheckpointIO().load_checkpoint(path)['step']}"
        except CorruptCheckpointError:
            raw = torch.load(path, weights_only=True)
            verdict = "refused intact" if bool((raw["w"] == raw["step"]).all()) else "refused damaged"
        results.append({"killed": f"{'after' if after else 'before'} rename {call}", "verdict": verdict})
print(json.dumps(results))
'''

CHECK = '''
import json, sys, torch
from pathlib import Path
from dz_lightning.checkpointing import CorruptCheckpointError, SafeCheckpointIO
path = sys.argv[1]
try:
    ckpt = SafeCheckpointIO().load_checkpoint(path)
    result = {"verdict": "loaded", "step": ckpt["step"]}
except CorruptCheckpointError as err:
    try:
        raw = torch.load(path, weights_only=True)
        whole = bool((raw["w"] == raw["step"]).all())
    except Exception:
        whole = False
    result = {"verdict": "refused_intact" if whole else "refused_damaged", "error": str(err)[:160]}
SafeCheckpointIO().save_checkpoint({"step": -1}, path)  # the next save, as the resumed run would do
result["temporaries_left"] = sum(p.name.endswith(".tmp") for p in Path(path).parent.iterdir())
print(json.dumps(result))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="checkout to run instead of the installed one")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mb", type=float, default=16.0, help="checkpoint size in MB")
    parser.add_argument("--max-delay", type=float, default=2.0,
                        help="kill up to this many seconds after the first save")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if args.source:
        env["PYTHONPATH"] = os.pathsep.join([str(args.source.resolve()), env.get("PYTHONPATH", "")])
    rng = random.Random(args.seed)
    n = int(args.mb * 2**20 / 4)
    counts = {"loaded": 0, "refused_intact": 0, "refused_damaged": 0}
    temporaries = 0
    details = []
    for run in range(args.runs):
        folder = Path(tempfile.mkdtemp(prefix="dz-kill-"))
        path = folder / "last.ckpt"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n)], env=env, stdout=subprocess.PIPE,
                                 text=True, cwd=folder)  # not the checkout: `-c` puts the working folder first
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        delay = rng.uniform(0.0, args.max_delay)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        out = subprocess.run([sys.executable, "-c", CHECK, str(path)], env=env, capture_output=True, text=True,
                             timeout=300, cwd=folder)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        counts[result["verdict"]] += 1
        temporaries += result["temporaries_left"]
        details.append({"run": run, "kill_after_s": round(delay, 3), **result})
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    sweep = subprocess.run([sys.executable, "-c", SWEEP], env=env, capture_output=True, text=True, timeout=600,
                           cwd=tempfile.gettempdir())
    print(json.dumps({"source": str(args.source or "installed"), "runs": args.runs, "checkpoint_mb": args.mb,
                      **counts, "temporaries_left_after_next_save": temporaries,
                      "killed_at_each_rename": (json.loads(sweep.stdout.strip().splitlines()[-1])
                                                if sweep.returncode == 0 else sweep.stderr.strip().splitlines()[-1:]),
                      "details": details}, indent=1))


if __name__ == "__main__":
    main()
