"""The README's Python snippets run as printed (each on its own, as a user would paste it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[tuple[str, str]]:
    """``(section heading, code)`` of every fenced ``python`` block of the README, in order."""
    blocks, heading = [], "top"
    for part in re.split(r"(^```python\n.*?^```$)", README.read_text(), flags=re.S | re.M):
        if part.startswith("```python"):
            blocks.append((heading, part[len("```python\n"):-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return blocks


BLOCKS = _python_blocks()


def _check_api(ns: dict) -> None:
    assert ns["est"].queries == sum(p.numel() for p in ns["model"].parameters()) + 1


def _check_own_module(ns: dict) -> None:
    trainer, zo_grasp = ns["trainer"], ns["trainer"].callbacks[0]
    assert trainer.state.finished and trainer.global_step > 0
    module = trainer.lightning_module
    assert set(module.zo_masks) == {"1.weight", "3.weight"} == set(zo_grasp.ratios)  # names of `zo_parameters()`
    assert zo_grasp.queries > 0  # scored from loss queries
    assert trainer.logged_metrics["train/loss"] < 2.0


def _check_staged(ns: dict) -> None:
    import warnings

    import torch.nn.functional as F

    from dz_lightning.reuse import GraphEngine, build_graph_engine

    assert ns["est"].queries == 33
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unmodified torchvision model is traced: no fallback warning
        engine = build_graph_engine(ns["net"], F.cross_entropy, ns["x"], ns["y"], ns["params"])
    assert type(engine) is GraphEngine  # the traced graph, not the stages() fallback or full forwards
    net, x = ns["MyNet"](), torch.rand(2, 3, 8, 8)
    out = x
    for stage in net.stages():
        out = stage(out)
    assert torch.equal(out, net(x))


CHECKS = {
    "The Python API in ten lines": _check_api,
    "Sparse CGE in your own LightningModule": _check_own_module,
    "Feature reuse for your own model": _check_staged,
}


def test_the_readme_has_the_snippets_we_check():
    assert [h for h, _ in BLOCKS] == list(CHECKS)


@pytest.mark.parametrize(("heading", "code"), BLOCKS, ids=[h for h, _ in BLOCKS])
def test_readme_snippet_runs(heading, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainer writes lightning_logs/ and checkpoints here
    ns: dict = {"__name__": "readme_snippet"}
    exec(compile(code, f"README.md: {heading}", "exec"), ns)  # noqa: S102 - the README's own code
    CHECKS[heading](ns)


def test_the_digits_figure_quotes_the_readme_zo_grasp_accuracy():
    """The legend of docs/images/loss_vs_queries_digits.png gives ZO-GraSP's accuracy from the README's own result."""
    from benchmarks.figures import DIGITS, digits_figure, reference_accuracy

    ref = reference_accuracy("ZO-GraSP 90% CGE")
    quoted = f"{100 * ref['mean']:.1f} ± {100 * ref['std']:.1f}% over {ref['seeds']} seeds"
    assert quoted in README.read_text()
    rows = [{"step": 1, "queries": 10, "loss": 2.0}, {"step": 2, "queries": 20, "loss": 1.0}]
    results = {label: {"curve": rows, "test_acc": 0.953, "queries": 20, "reference": reference_accuracy(label)}
               for label in DIGITS}
    legend = [t.get_text() for t in digits_figure(results).axes[0].get_legend().get_texts()]
    assert f"ZO-GraSP 90% CGE: {100 * ref['mean']:.1f} ± {100 * ref['std']:.1f}% test ({ref['seeds']} seeds)" in legend
    assert "dense CGE: 95.3% test" in legend  # the others: this run's accuracy
