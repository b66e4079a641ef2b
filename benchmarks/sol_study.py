"""Solver-in-the-loop study: SRC, NON, FO-SOL, FO-SOL sparse and ZO-SOL on the Karman wake (CPU-sized).

Protocol (no choice is made on the test simulations):

1. Reference data are generated once (or reused from the cache): training windows, held-out *validation*
   simulations and *test* simulations, each set with its own Reynolds numbers.
2. Learning-rate selection, the same grid for every method: half-decade steps from ``--lr-min`` to ``--lr-max``
   (1e-4 ... 1e-2). With the first of ``--seeds``, every method trains once per rate, all for the same epochs, and
   keeps the rate with the lowest validation MAE. While the best rate is at an edge of the grid, the grid is extended
   by one half-decade in that direction (at most ``--max-extensions`` times), so the chosen rate lies inside it.
   ZO-SOL's layer-wise pruning ratios are chosen the same way: its grid runs with the first of ``--zo-ratios``, then
   every other ratio method runs at the chosen rate.
3. Every method then trains with its chosen settings for every seed and is evaluated once on the test simulations
   (the selection run of the first seed is that seed's run). SRC has nothing to train.

FO-SOL sparse is the control that separates the estimator from the sparsity: FO-SOL's exact gradient under the
masks ZO-SOL uses (the same ZOGraSP callback, ratio method and seed, hence the same masks at every step). Its ratio
method is ZO-SOL's chosen one when ZO-SOL ran in the same study, else ``--fo-sparse-ratios`` (a method, or the JSON
of a study that chose ZO-SOL's).

ZO-GraSP's (or random) layer-wise ratios depend only on the seed: they are scored in the first run of a seed and
loaded by its other runs (``lpr_<method>_seed<seed>.json`` beside the weights), ZO-SOL's and FO-SOL sparse's alike.

Every run records its process's resident memory (RSS) every ``--rss-every`` optimizer steps. Runs are resumable:
with ``--json``, each finished run is written at once, with its corrector's weights under ``<json>.models/``; the
same command again skips the runs already done (the settings must match). Long studies can run their methods in
separate processes (``--methods``), one thread each, and ``--merge a.json b.json --json all.json`` joins them.
Processes on one machine may also share one ``--json``: each trains the runs no other live process has claimed
(a ``<run>.claim`` file beside the weights holds the claiming process's id), waits for the others' runs, and merges
its records into the file under a lock. Two processes with the same command split one method's grid and seeds.

Prints the final JSON as its last line:
``{"test_mae": {method: {"mean", "std", "min", "max", "by_seed"}}, "selection": {...}, "ordering": [...], ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.karman import KarmanSolver
from dz_lightning.tasks.sol import (
    FOSOL,
    ZOSOL,
    FOSOLSparse,
    KarmanDataModule,
    NONCorrector,
    SOLOracle,
    SourceOnly,
)

from dz_lightning.checkpointing import atomic_write
from dz_lightning.models import SOLCorrector

METHODS = ("non", "fo_sol", "fo_sol_sparse", "zo_sol")
SPARSE = ("fo_sol_sparse", "zo_sol")  # trained under ZOGraSP's masks
RATIO_METHODS = ("zo_grasp", "uniform", "random")
# settings that may differ between the processes of one study (everything else must agree to resume or merge)
_PER_PROCESS = ("methods", "seeds", "zo_ratios")  # zo_ratios: ZO-SOL's own grid (FO-SOL sparse reads its choice)
POLL_SECONDS = 10.0  # how often a process waiting for another's run looks again


def _boot() -> str:
    """This boot of the machine (Linux), so that a claim left by a process of an earlier boot is stale whatever
    process has its id now; ``""`` where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim(path: Path) -> bool:
    """Claim the run whose claim file is ``path`` for this process; ``False`` while another live process holds it.

    The claim (``<pid> <boot id>``) appears whole or not at all (a hard link of a file that already holds it), so a
    reader never sees an empty claim. The claim of a process that has died, or of an earlier boot, is taken over.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()} {_boot()}".strip())
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                try:
                    pid, _, boot = path.read_text().partition(" ")
                    holder = int(pid)
                except (OSError, ValueError):  # removed in between, or not a claim: look again
                    holder, boot = 0, ""
                if holder and holder != os.getpid() and boot.strip() == _boot() and _alive(holder):
                    return False
                path.unlink(missing_ok=True)
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (no lock where ``fcntl`` is missing: one process per JSON there)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _on_disk(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def half_decades(lo: float, hi: float) -> list[float]:
    """``10 ** (k / 2)`` from ``lo`` to ``hi`` (both rounded to the nearest half-decade)."""
    first, last = round(2 * math.log10(lo)), round(2 * math.log10(hi))
    if last < first:
        raise ValueError(f"Expected --lr-min <= --lr-max, but got {lo:g} and {hi:g}.")
    return [_half_decade(k) for k in range(first, last + 1)]


def _half_decade(k: int) -> float:
    return float(f"{10 ** (k / 2):.3g}")


def extension(val_mae: dict[float, float]) -> float | None:
    """The next half-decade past the grid's edge when the best rate (lowest validation MAE) lies at that edge.

    ``val_mae``: learning rate -> validation MAE of the rates tried so far. ``None`` when the best rate is inside
    (or when a single rate gives no direction).
    """
    if len(val_mae) < 2:
        return None
    best = min(val_mae, key=val_mae.get)
    if min(val_mae) < best < max(val_mae):
        return None
    return _half_decade(round(2 * math.log10(best)) + (-1 if best == min(val_mae) else 1))


def resident_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSRecorder(L.Callback):
    """``(optimizer step, RSS in MB)`` at the start of training and every ``every`` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every, self.curve = every, []  # type: list[list]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.curve.append([trainer.global_step, round(resident_mb(), 1)])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.curve.append([trainer.global_step, round(resident_mb(), 1)])


def main(argv: list[str] | None = None) -> dict:
    """Run the study; Lightning's scratch folder is removed afterwards, also when a run fails."""
    root = tempfile.mkdtemp(prefix="sol_study_")
    try:
        return _study(argv, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", default="data/karman")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the first one selects the settings")
    parser.add_argument("--lr-min", type=float, default=1e-4, help="lowest Adam learning rate of the common grid")
    parser.add_argument("--lr-max", type=float, default=1e-2, help="highest Adam learning rate of the common grid")
    parser.add_argument("--max-extensions", type=int, default=3,
                        help="half-decades the grid may grow past an edge where the best rate lies")
    parser.add_argument("--zo-ratios", default="uniform,zo_grasp",
                        help="ZO-SOL's layer-wise pruning ratio methods (ZOGraSP `method`), chosen on validation")
    parser.add_argument("--fo-sparse-ratios", default=None,
                        help="FO-SOL sparse's ratio method when ZO-SOL is not in this study: a ZOGraSP method, or "
                             "the JSON of a study whose ZO-SOL chose it")
    parser.add_argument("--mu", type=float, default=1e-4, help="ZO-SOL finite-difference step (see ZOSOL)")
    parser.add_argument("--difference", default="forward", choices=["forward", "central"],
                        help="ZO-SOL finite differences; central ones cost twice the queries")
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                        help="learning rate of every method: cosine decay to 0 over the run's steps, or constant")
    parser.add_argument("--warmup", type=int, default=250, help="reference steps discarded before recording")
    parser.add_argument("--window", type=int, default=8, help="unrolled solver steps m per training window")
    parser.add_argument("--steps", type=int, default=300,
                        help="recorded steps per simulation (the validation and test MAE cover all of them)")
    parser.add_argument("--resample-steps", type=int, default=1,
                        help="the sparse masks are redrawn every N optimizer steps (0: every epoch instead)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to train (SRC is always evaluated)")
    parser.add_argument("--rss-every", type=int, default=100, help="record the RSS every this many optimizer steps")
    parser.add_argument("--out", default="benchmarks/out", help="folder of the bar chart")
    parser.add_argument("--json", default=None,
                        help="write the results here after every run; an existing file is resumed")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="join the JSON files of one study's processes into --json, train nothing")
    parser.add_argument("--long-steps", type=int, default=0,
                        help="also roll the chosen runs out this many steps on the test Reynolds numbers (0: skip)")
    parser.add_argument("--timing", action="store_true", help="also time batched vs looped ZO-SOL queries")
    return parser


def _study(argv: list[str] | None, root: str) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.merge:
        if not args.json:
            parser.error("--merge needs --json, the file to write")
        return merge(args.merge, args.json)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not seeds:
        parser.error("--seeds needs at least one seed")
    zo_ratios = [r for r in args.zo_ratios.split(",") if r]
    if not zo_ratios or set(zo_ratios) - set(RATIO_METHODS):
        parser.error(f"--zo-ratios {args.zo_ratios!r}: choose from {', '.join(RATIO_METHODS)}")
    try:
        grid = half_decades(args.lr_min, args.lr_max)
    except ValueError as err:
        parser.error(str(err))
    if "fo_sol_sparse" in methods and "zo_sol" not in methods and args.fo_sparse_ratios is None:
        parser.error("fo_sol_sparse without zo_sol needs --fo-sparse-ratios (a ZOGraSP method, or the JSON of the "
                     "study whose ZO-SOL chose one): its masks must be ZO-SOL's")

    start = time.perf_counter()
    data = KarmanDataModule(cache_dir=args.cache, steps=args.steps, window=args.window, warmup=args.warmup)
    data.setup()  # generates the data on a cold cache, else loads it once
    long = None
    if args.long_steps:
        long = KarmanDataModule(cache_dir=args.cache, steps=args.steps, window=args.window, warmup=args.warmup,
                                test_steps=args.long_steps)
        long.setup()
    total_steps = len(data.train_dataloader()) * args.epochs
    val = (data.data["val"], data.data["val_re"])
    test = (data.data["test"], data.data["test_re"])
    settings = {"epochs": args.epochs, "optimizer_steps": total_steps, "mu": args.mu,
                "difference": args.difference, "sparsity": args.sparsity, "schedule": args.schedule,
                "window": args.window, "steps": args.steps, "warmup": args.warmup,
                "resample_steps": args.resample_steps, "width": args.width, "seeds": seeds, "methods": methods,
                "lr_grid": grid, "max_extensions": args.max_extensions, "zo_ratios": zo_ratios,
                "train_re": data.train_re, "val_re": data.val_re, "test_re": data.test_re,
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    models = Path(f"{args.json}.models") if args.json else Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)

    def build(method: str, lr: float, ratios: str | None, seed: int) -> tuple[Any, list]:
        adam = lambda p: torch.optim.Adam(p, lr=lr)  # noqa: E731
        cosine = (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, total_steps)) \
            if args.schedule == "cosine" else None
        corrector = SOLCorrector(width=args.width)
        if method == "non":
            return NONCorrector(corrector, optimizer=adam, lr_scheduler=cosine), []
        if method == "fo_sol":
            return FOSOL(corrector, optimizer=adam, lr_scheduler=cosine), []
        if method == "fo_sol_sparse":
            module: Any = FOSOLSparse(corrector, optimizer=adam, lr_scheduler=cosine)
        else:
            module = ZOSOL(corrector, optimizer=adam, nonfinite="skip", mu=args.mu, difference=args.difference,
                           lr_scheduler=cosine)
        if args.sparsity == 0:
            return module, []
        # the LPRs depend only on the seed (the initial weights, the scoring draws): scored once per seed and method,
        # then loaded by every other run of that seed (a ZO-GraSP scoring costs hundreds of solver queries)
        lpr = None if ratios == "uniform" else models / f"lpr_{ratios}_seed{seed}.json"
        return module, [ZOGraSP(sparsity=args.sparsity, method=ratios, resample_every_n_epochs=1,
                                resample_every_n_steps=args.resample_steps or None, seed=seed,
                                ratios_path=str(lpr) if lpr is not None and lpr.is_file() else None,
                                save_ratios_path=None if lpr is None else str(lpr))]

    result = _resumed(args.json, settings) or {
        "protocol": "one half-decade lr grid for every method, extended past an edge that holds the best rate; lr "
                    "(and ZO-SOL ratios) chosen on validation MAE with the first seed, same epochs for all; test "
                    "MAE once per seed with the chosen settings",
        "selection": {}, "test_mae": {}, "runs": {}, "seconds_by_method": {}}
    result["settings"] = settings
    source = SourceOnly()
    result["src"] = {"val_mae": float(source.rollout_mae(*val)[1]), "test_mae": float(source.rollout_mae(*test)[1])}
    result["seconds_by_method"]["data"] = time.perf_counter() - start
    if long is not None:
        result[f"src_mae_{args.long_steps}_steps"] = float(source.rollout_mae(long.data["test"],
                                                                              long.data["test_re"])[1])

    def save() -> None:
        result["seconds"] = result.get("seconds_before_resume", 0.0) + time.perf_counter() - start
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with _locked(args.json):
                _merge_into(result, _on_disk(args.json))  # the records of other processes sharing the file
                text = json.dumps(result, indent=2)
                atomic_write(args.json, lambda tmp: tmp.write_text(text))

    def run(method: str, lr: float, seed: int, ratios: str | None) -> tuple[Any, dict] | None:
        """Train one run, or load it when the study has it; the trained module and its record.

        ``None`` when another live process is training it (see :func:`claim`).
        """
        key = f"{method}_lr{lr:g}_seed{seed}" + (f"_{ratios}" if ratios else "")
        weights = models / f"{key}.pt"
        if args.json:
            with _locked(args.json):
                result["runs"].update((_on_disk(args.json) or {}).get("runs", {}))
        if key in result["runs"] and weights.is_file():
            L.seed_everything(seed, verbose=False)
            module, _ = build(method, lr, ratios, seed)
            module.corrector.load_state_dict(torch.load(weights, weights_only=True))
            print(f"{key}: done before, val MAE {result['runs'][key]['val_mae']:.5f}", flush=True)
            return module, result["runs"][key]
        held = models / f"{key}.claim"
        if not claim(held):
            return None
        try:
            return train(method, lr, seed, ratios, key, weights)
        finally:
            held.unlink(missing_ok=True)

    def train(method: str, lr: float, seed: int, ratios: str | None, key: str, weights: Path) -> tuple[Any, dict]:
        L.seed_everything(seed, verbose=False)
        module, callbacks = build(method, lr, ratios, seed)
        rss = RSSRecorder(args.rss_every)
        t = time.perf_counter()
        L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                  callbacks=[*callbacks, rss], default_root_dir=root).fit(module, data)
        record = {"method": method, "lr": lr, "seed": seed, "seconds": time.perf_counter() - t,
                  "val_mae": float(module.rollout_mae(*val)[1]), "rss_mb": rss.curve}
        if method in SPARSE:
            record["ratios"] = ratios
            if callbacks:
                record["lpr"] = callbacks[0].ratios
                record["zo_grasp_queries"] = callbacks[0].queries  # 0 where the seed's LPRs were loaded
        if method == "zo_sol":
            record["queries"] = module.queries_total
        torch.save(module.corrector.state_dict(), weights)
        result["runs"][key] = record
        save()
        print(f"{key}: val MAE {record['val_mae']:.5f} in {record['seconds']:.0f} s, RSS {rss.curve[-1][1]} MB",
              flush=True)
        return module, record

    def run_all(method: str, items: list[tuple[float, int, str | None]]) -> list[tuple[Any, dict]]:
        """``run`` every ``(lr, seed, ratios)``: first those nobody else trains, then wait for the others' runs."""
        done: dict[int, tuple[Any, dict]] = {}
        said = False
        while True:
            for i, item in enumerate(items):
                if i not in done and (got := run(method, *item)) is not None:
                    done[i] = got
            if len(done) == len(items):
                return [done[i] for i in range(len(items))]
            if not said:
                print(f"{method}: waiting for {len(items) - len(done)} run(s) of another process", flush=True)
                said = True
            time.sleep(POLL_SECONDS)

    for method in methods:
        ratios = None
        if method == "zo_sol":
            ratios = zo_ratios[0]
        elif method == "fo_sol_sparse":
            ratios = _sparse_ratios(result, args.fo_sparse_ratios)
        runs: list[dict] = []
        trained: list[Any] = []
        result["selection"][method] = runs

        def select(items: list[tuple[float, str | None]], runs: list[dict] = runs, trained: list[Any] = trained,
                   method: str = method) -> None:
            for module, record in run_all(method, [(lr, seeds[0], r) for lr, r in items]):
                runs.append(record)
                trained.append(module)
            save()

        select([(lr, ratios) for lr in grid])
        for _ in range(args.max_extensions):
            lr = extension({r["lr"]: r["val_mae"] for r in runs})
            if lr is None:
                break
            print(f"{method}: the best rate is at the grid's edge; extending it to {lr:g}", flush=True)
            select([(lr, ratios)])
        best = min(range(len(runs)), key=lambda i: runs[i]["val_mae"])
        if method == "zo_sol" and len(zo_ratios) > 1:
            select([(runs[best]["lr"], other) for other in zo_ratios[1:]])
            best = min(range(len(runs)), key=lambda i: runs[i]["val_mae"])
        lrs_tried = sorted({r["lr"] for r in runs})
        chosen = {"lr": runs[best]["lr"], "ratios": runs[best].get("ratios"),
                  "inside_grid": lrs_tried[0] < runs[best]["lr"] < lrs_tried[-1], "lrs_tried": lrs_tried}
        by_seed = {seeds[0]: float(trained[best].rollout_mae(*test)[1])}
        modules = {seeds[0]: trained[best]}
        seed_runs = [runs[best]]
        result["test_mae"][method] = _summary(chosen, by_seed, seed_runs)
        save()
        others = run_all(method, [(chosen["lr"], seed, chosen["ratios"]) for seed in seeds[1:]])
        for seed, (module, record) in zip(seeds[1:], others, strict=True):
            by_seed[seed] = float(module.rollout_mae(*test)[1])
            modules[seed] = module
            seed_runs.append(record)
        result["test_mae"][method] = _summary(chosen, by_seed, seed_runs)
        save()
        result["seconds_by_method"][method] = {
            "per_seed_mean": statistics.fmean(r["seconds"] for r in seed_runs),
            "selection_total": sum(r["seconds"] for r in runs)}
        if long is not None:
            result["test_mae"][method][f"mae_{args.long_steps}_steps"] = {
                s: float(m.rollout_mae(long.data["test"], long.data["test_re"])[1]) for s, m in modules.items()}
        print(f"{method}: chosen {chosen}, test MAE {result['test_mae'][method]['mean']:.5f} "
              f"+- {result['test_mae'][method]['std']:.5f} over {len(by_seed)} seed(s)", flush=True)
        save()

    result["ordering"] = _ordering(result)
    if args.timing:
        result["seconds_by_method"]["batched_vs_loop"] = batched_vs_loop(data, args.width)
    save()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    means = {"src": result["src"]["test_mae"], **{m: v["mean"] for m, v in result["test_mae"].items()}}
    _plot(means, {m: v["std"] for m, v in result["test_mae"].items()}, out / "sol_study.png")
    print(json.dumps(result))
    return result


def _merge_into(result: dict, disk: dict | None) -> None:
    """Add the records that another process sharing the JSON wrote; this process's own entries win."""
    if disk is None:
        return
    for key in ("runs", "selection", "test_mae", "seconds_by_method"):
        result[key] = {**disk.get(key, {}), **result[key]}
    methods = result["settings"]["methods"]
    result["settings"]["methods"] = [*[m for m in disk["settings"]["methods"] if m not in methods], *methods]


def _shared(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _PER_PROCESS}


def _resumed(path: str | None, settings: dict) -> dict | None:
    """The study in ``path`` to resume (``None``: nothing there); refuses one run with other settings."""
    if not path or not Path(path).is_file():
        return None
    old = json.loads(Path(path).read_text())
    if "runs" not in old:
        raise SystemExit(f"{path} is a study from before resumable runs; give another --json.")
    if _shared(old["settings"]) != _shared(settings):
        diff = {k: (old["settings"].get(k), v) for k, v in _shared(settings).items()
                if old["settings"].get(k) != v}
        raise SystemExit(f"{path} holds a study with other settings (old, new): {diff}; give another --json.")
    old["seconds_before_resume"] = old.get("seconds", 0.0)
    old["selection"], old["test_mae"] = {}, {}  # rebuilt from the runs, in this process's order
    print(f"Resuming {path}: {len(old['runs'])} runs done.", flush=True)
    return old


def _sparse_ratios(result: dict, given: str | None) -> str:
    """FO-SOL sparse's ratio method: ZO-SOL's choice in this study, else ``--fo-sparse-ratios``."""
    if "zo_sol" in result["test_mae"]:
        return result["test_mae"]["zo_sol"]["chosen"]["ratios"]
    if given in RATIO_METHODS:
        return given
    if given is None or not Path(given).is_file():
        raise SystemExit(f"--fo-sparse-ratios {given!r}: expected one of {RATIO_METHODS} or a study JSON file.")
    study = json.loads(Path(given).read_text())
    try:
        return study["test_mae"]["zo_sol"]["chosen"]["ratios"]
    except KeyError:
        raise SystemExit(f"{given} has no chosen ZO-SOL ratios yet (its ZO-SOL selection is not finished).") from None


def _ordering(result: dict) -> list[str]:
    means = {"src": result["src"]["test_mae"], **{m: v["mean"] for m, v in result["test_mae"].items()}}
    return sorted(means, key=means.get)


def merge(paths: list[str], out: str) -> dict:
    """Join the studies of several processes (same shared settings) into one JSON at ``out``."""
    studies = [json.loads(Path(p).read_text()) for p in paths]
    first = studies[0]
    for path, study in zip(paths[1:], studies[1:], strict=True):
        if _shared(study["settings"]) != _shared(first["settings"]):
            raise SystemExit(f"{path} has other settings than {paths[0]}; only one study's processes merge.")
    result = {k: first[k] for k in ("protocol", "src")}
    result["settings"] = {**first["settings"], "methods": [m for s in studies for m in s["settings"]["methods"]]}
    for key in ("selection", "test_mae", "runs", "seconds_by_method"):
        result[key] = {k: v for s in studies for k, v in s[key].items()}
    result["seconds"] = sum(s["seconds"] for s in studies)
    result["merged_from"] = paths
    result["ordering"] = _ordering(result)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def _summary(chosen: dict, by_seed: dict[int, float], runs: list[dict]) -> dict[str, Any]:
    values = list(by_seed.values())
    summary = {"chosen": chosen, "by_seed": by_seed, "mean": statistics.fmean(values),
               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
               "val_mae_by_seed": {r["seed"]: r["val_mae"] for r in runs}}
    if "queries" in runs[0]:
        summary["queries_per_run"] = runs[0]["queries"]
    return summary


def batched_vs_loop(data: KarmanDataModule, width: int, k: int = 32) -> dict[str, float]:
    """Seconds for ``k`` perturbed ZO-SOL queries on one batch: one PhiFlow batch of ``k * B`` simulations vs a loop.

    Both paths are warmed up first (PhiFlow traces the jit-compiled step once per batch shape).
    """
    data.setup()
    windows, re = next(iter(data.train_dataloader()))
    corrector = SOLCorrector(width=width)
    params = {n: p.detach() for n, p in corrector.named_parameters()}
    name = next(reversed(params))  # the last layer's bias: every perturbation changes the loss
    stacked = params[name] + 1e-3 * torch.randn(k, *params[name].shape)
    oracle = SOLOracle(corrector, KarmanSolver(data.resolution), windows, re, max_batch=k)
    oracle.losses(params, {name: stacked})
    oracle.loss({**params, name: stacked[0]})
    t = time.perf_counter()
    batched = oracle.losses(params, {name: stacked})
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = torch.stack([oracle.loss({**params, name: w}) for w in stacked])
    t_loop = time.perf_counter() - t
    return {"queries": k, "batched": t_batched, "loop": t_loop, "speedup": t_loop / t_batched,
            "max_abs_diff": float((batched - loop).abs().max())}


def _plot(means: dict[str, float], stds: dict[str, float], path: Path) -> None:
    from dz_lightning.figures import new_figure, save_figure

    names: list[str] = list(means)
    fig = new_figure(4.5, 3.0)
    ax = fig.add_subplot()
    ax.bar(names, [means[n] for n in names], yerr=[stds.get(n, 0.0) for n in names], capsize=3)
    ax.set_ylabel("test MAE vs reference")
    ax.set_title("Karman wake, solver in the loop")
    fig.tight_layout()
    save_figure(fig, path)

if __name__ == "__main__":
    main()
