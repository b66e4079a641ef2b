"""The SOL study's protocol: one half-decade grid, extended past an edge; resumable runs; merged processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sol_study


def test_the_grid_is_half_decades_and_grows_towards_an_edge_that_holds_the_best_rate():
    assert sol_study.half_decades(1e-4, 1e-2) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    assert sol_study.extension({1e-4: 0.05, 3.16e-4: 0.06, 1e-3: 0.07}) == 3.16e-5  # best at the low edge
    assert sol_study.extension({1e-4: 0.07, 3.16e-4: 0.06, 1e-3: 0.05}) == 3.16e-3  # best at the high edge
    assert sol_study.extension({1e-4: 0.07, 3.16e-4: 0.05, 1e-3: 0.06}) is None  # inside: done
    assert sol_study.extension({1e-3: 0.05}) is None
    with pytest.raises(ValueError, match="lr-min <= --lr-max"):
        sol_study.half_decades(1e-2, 1e-4)


def _args(tmp_path, *extra):
    return ["--cache", str(tmp_path / "cache"), "--epochs", "1", "--steps", "6", "--warmup", "3", "--window", "2",
            "--width", "1", "--seeds", "0", "--lr-min", "1e-3", "--lr-max", "3.16e-3", "--max-extensions", "1",
            "--out", str(tmp_path / "out"), *extra]


def test_a_study_resumes_its_runs_and_its_processes_merge(tmp_path, capsys):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    first = sol_study.main(_args(tmp_path, "--methods", "non", "--json", a))
    runs = first["runs"]
    # two rates, plus one half-decade past the edge that held the best
    chosen = first["test_mae"]["non"]["chosen"]
    assert len(runs) == 3 and chosen["lrs_tried"] in ([3.16e-4, 1e-3, 3.16e-3], [1e-3, 3.16e-3, 1e-2])
    assert chosen["inside_grid"] == (chosen["lrs_tried"][0] < chosen["lr"] < chosen["lrs_tried"][-1])
    assert all(r["rss_mb"] and r["rss_mb"][0][1] > 0 for r in runs.values())
    again = sol_study.main(_args(tmp_path, "--methods", "non", "--json", a))  # resumed: nothing retrained
    assert again["runs"] == runs and again["test_mae"]["non"] == first["test_mae"]["non"]
    assert capsys.readouterr().out.count("done before") == 3
    with pytest.raises(SystemExit, match="other settings"):
        sol_study.main(_args(tmp_path, "--methods", "non", "--json", a, "--mu", "1e-3"))
    with pytest.raises(SystemExit):  # the control's masks must be ZO-SOL's: its ratio method is required
        sol_study.main(_args(tmp_path, "--methods", "fo_sol_sparse", "--json", b))
    sparse = sol_study.main(_args(tmp_path, "--methods", "fo_sol_sparse", "--json", b, "--fo-sparse-ratios",
                                  "uniform"))
    assert {r["ratios"] for r in sparse["runs"].values()} == {"uniform"}
    merged = sol_study.main(["--merge", a, b, "--json", str(tmp_path / "all.json")])
    assert set(merged["test_mae"]) == {"non", "fo_sol_sparse"} and len(merged["runs"]) == 6
    assert set(merged["ordering"]) == {"src", "non", "fo_sol_sparse"}
    assert json.loads((tmp_path / "all.json").read_text()) == merged


def test_zo_grasp_ratios_are_scored_once_per_seed_and_loaded_by_its_other_runs(tmp_path):
    study = sol_study.main(_args(tmp_path, "--methods", "zo_sol", "--zo-ratios", "zo_grasp", "--max-extensions", "0",
                                 "--json", str(tmp_path / "zo.json")))
    first, second = study["runs"].values()
    assert first["zo_grasp_queries"] > 0 and second["zo_grasp_queries"] == 0  # loaded
    assert first["lpr"] == second["lpr"] and first["lpr"]["4.weight"] < 1  # the zero-initialized head is not frozen
    assert (tmp_path / "zo.json.models" / "lpr_zo_grasp_seed0.json").is_file()


def test_a_claim_holds_while_its_process_lives_and_is_taken_over_when_it_died(tmp_path):
    held = tmp_path / "run.claim"
    mine = f"{os.getpid()} {sol_study._boot()}".strip()
    assert sol_study.claim(held) and held.read_text() == mine
    held.unlink()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = f"{sleeper.pid} {sol_study._boot()}".strip()
        held.write_text(theirs)
        assert not sol_study.claim(held) and held.read_text() == theirs  # alive: another's run
        held.write_text(f"{sleeper.pid} another-boot")
        assert sol_study.claim(held) and held.read_text() == mine  # an earlier boot's claim: stale, whatever its id
        held.write_text(theirs)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sol_study.claim(held) and held.read_text() == mine  # its process died: taken over
    assert list(tmp_path.iterdir()) == [held]  # no temporary left behind


def test_two_processes_sharing_one_json_split_the_runs_and_agree(tmp_path):
    study = str(tmp_path / "shared.json")
    command = [sys.executable, "-m", "benchmarks.sol_study", *_args(tmp_path, "--methods", "non", "--seeds", "0,1",
                                                                     "--max-extensions", "0", "--json", study)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              cwd=Path(sol_study.__file__).parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [line for out in outs for line in out.splitlines() if line.startswith("non_lr") and " in " in line]
    # two grid rates with seed 0, the chosen rate with seed 1: each trained by exactly one of the two processes
    assert sorted(line.split(":")[0] for line in trained) == sorted(json.loads(Path(study).read_text())["runs"])
    assert len(trained) == 3
    finals = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert finals[0]["test_mae"] == finals[1]["test_mae"] and len(finals[0]["test_mae"]["non"]["by_seed"]) == 2
    assert not list(Path(f"{study}.models").glob("*.claim"))
