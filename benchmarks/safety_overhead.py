"""Cost of the per-step safety checks of ZOModule and CGE on a ResNet-20 (270k parameters).

Measured per optimizer step: the snapshot kept to undo a step (parameters and SGD momentum), the fused ``isfinite``
check of parameters and optimizer state after the step, and the check that ``mu`` changes the parameters in their
dtype (fast path: mu well above the float resolution). Per query of a ``FunctionOracle``: the copy of every
parameter handed to the black box (``function_oracle_copy_ms``, so that it never sees views of the weights). For
scale, ``one_query_ms`` is one forward of the batch.
The last line printed is one JSON object.

Usage: ``python benchmarks/safety_overhead.py --batch 64 --repeats 50``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from dz_lightning.finite_step import StepUndo
from dz_lightning.models import resnet20
from dz_lightning.resolution import check_step_resolves


def _ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = resnet20().to(args.device)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # momentum buffers exist, as in training
    undo = StepUndo([opt])
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: (fn(), sync())

    with torch.no_grad():
        result = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in params.values()),
            "snapshot_ms": _ms(timed(lambda: StepUndo([opt])), args.repeats),
            "finite_check_ms": _ms(timed(undo.nonfinite), args.repeats),
            "mu_check_ms": _ms(timed(lambda: check_step_resolves(params, 5e-3, None)), args.repeats),
            "function_oracle_copy_ms": _ms(timed(lambda: {n: v.detach().clone() for n, v in params.items()}),
                                           args.repeats),
            "one_query_ms": _ms(timed(lambda: model(x)), max(3, args.repeats // 10)),
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
