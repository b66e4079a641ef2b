"""Full forwards of untraceable models: every strategy, and the automatic choice, equal the one-at-a-time loop."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import one_query_at_a_time
from torch import nn

import dz_lightning as dz
from benchmarks.fallback_models import FALLBACK_MODELS, GatedCNN, InPlaceResNet
from dz_lightning import fallback

# model -> parameters whose one-coordinate queries vmap with shared inputs cannot run (they vary a value that an
# in-place add writes into a tensor that does not vary, or that feeds an `if` or NumPy); per-point inputs get past
# the in-place add only
VMAP_FAILS = {
    "inplace_resnet": lambda n: ".shortcut." in n,
    "gated_cnn": lambda n: n.startswith("stem."),
    "numpy_gate_cnn": lambda n: n.startswith("conv1."),
}
PER_POINT_FAILS = {
    "inplace_resnet": lambda n: False,
    "gated_cnn": lambda n: True,
    "numpy_gate_cnn": lambda n: True,
}


def _setup(model_name: str, train: bool, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = FALLBACK_MODELS[model_name]().to(dtype).train(train)
    x, y = torch.randn(3, 3, 8, 8, dtype=dtype), torch.randint(0, 10, (3,))
    return model, x, y


def _fails(model_name: str, strategy: str, name: str) -> bool:
    return {"vmap": VMAP_FAILS, "vmap_per_point": PER_POINT_FAILS}.get(strategy, {}).get(
        model_name, lambda n: False)(name)


@pytest.mark.parametrize("strategy", ["auto", "first_working", *fallback.STRATEGIES])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name", list(FALLBACK_MODELS))
def test_every_strategy_equals_one_query_at_a_time_in_float64(model_name, train, strategy):
    """The model runs in float64, so any difference beyond float64 rounding (a wrong point, a stale BatchNorm
    statistic, a 0.999 scaling) shows; a strategy that cannot run a parameter raises instead of answering."""
    model, x, y = _setup(model_name, train)
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False, fallback=strategy)
    params = dict(model.named_parameters())
    answered = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the choice's warning (tested below)
        for name, p in params.items():
            index = torch.randperm(p.numel())[:5]
            if _fails(model_name, strategy, name):
                with pytest.raises(RuntimeError):
                    oracle.coordinate_losses(params, name, index, 1e-2)
                continue
            got = oracle.coordinate_losses(params, name, index, 1e-2)
            want = one_query_at_a_time(model, F.cross_entropy, x, y, name, index, 1e-2)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
            answered += 1
    assert answered > 0 or strategy == "vmap_per_point"


@pytest.mark.parametrize("k", [1, 3, 40])
def test_auto_choice_answers_every_point_and_the_first_call_like_the_later_ones(k):
    """The trial is a measurement: the chosen strategy answers every point of the call that chose it, so that
    call's values are those of every later call, bit for bit; a trial costs no query."""
    model, x, y = _setup("inplace_resnet", True)
    params = dict(model.named_parameters())
    index = torch.arange(40) * 7 % params["layers.0.conv2.weight"].numel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False, max_batch=k)
        got = oracle.coordinate_losses(params, "layers.0.conv2.weight", index, 1e-2)
        assert oracle.queries == 40
        again = oracle.coordinate_losses(params, "layers.0.conv2.weight", index, 1e-2)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    want = one_query_at_a_time(model, F.cross_entropy, x, y, "layers.0.conv2.weight", index, 1e-2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    made = fallback.choices(model)
    assert sorted(s[2] for s in made) == sorted({k, 40 % k} - {0})  # K per call: the chunk and the remainder
    for choice in made.values():
        assert choice.strategy in fallback.STRATEGIES and "loop" in choice.points_per_s and not choice.failed


def test_a_vmap_failure_is_remembered_and_never_repeated(monkeypatch):
    model, x, y = _setup("gated_cnn", True, torch.float32)
    calls = {"vmap": 0, "vmap_per_point": 0}

    def counted(name):
        strategy = fallback.STRATEGIES[name]

        def run(*args):
            calls[name] += 1
            return strategy.run(*args)

        return dataclasses.replace(strategy, run=run)

    monkeypatch.setattr(fallback, "STRATEGIES", {**fallback.STRATEGIES, **{n: counted(n) for n in calls}})
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # a new oracle per batch, as in training: the failure is the model's, not the oracle's
            oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False, max_batch=4)
            oracle.coordinate_losses(params, "stem.0.weight", torch.arange(12), 1e-2)
            assert calls == {"vmap": 1, "vmap_per_point": 1}  # one failed warm-up each, then never again
    choice = next(c for s, c in fallback.choices(model).items() if s[1] == ("stem.0.weight",))
    assert choice.strategy == "loop" and set(choice.failed) == {"vmap", "vmap_per_point"}
    assert "data-dependent control flow" in " ".join(choice.failed.values()) or choice.failed["vmap"]
    model.eval()  # a new structure (train/eval) is a new situation: the strategies are tried again there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            params, "stem.0.weight", torch.arange(3), 1e-2)
    assert calls == {"vmap": 2, "vmap_per_point": 2}


def test_one_warning_per_model_type_names_the_choice_and_the_ratio(monkeypatch):
    monkeypatch.setattr(fallback, "_WARNED", set())

    class Net(GatedCNN):
        pass

    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    model = Net()
    params = dict(model.named_parameters())
    # which one wins depends on the machine and its load; the message names the measured ratio either way
    with pytest.warns(UserWarning, match=r"^vmap with shared inputs ran at \d+\.\d\dx .* for Net's 'head\.3\.weight'"
                                         r", so its full forwards use (vmap with shared inputs|a Python loop over "
                                         r"points) \(") as record:
        dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            params, "head.3.weight", torch.arange(20), 1e-2)
    assert len(record) == 1 and len(str(record[0].message)) < 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model type: not for another parameter, nor another instance
        dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            params, "stem.0.weight", torch.arange(3), 1e-2)
        other = Net()
        dz.ModuleOracle(other, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            dict(other.named_parameters()), "up.bias", torch.arange(3), 1e-2)


def test_a_loop_choice_names_the_failure(monkeypatch):
    monkeypatch.setattr(fallback, "_WARNED", set())
    model, x, y = _setup("numpy_gate_cnn", True, torch.float32)
    with pytest.warns(UserWarning, match=r"^vmap failed \(RuntimeError: .*\) for NumpyGateCNN's 'conv1\.weight', so "
                                         r"its full forwards use a Python loop over points"):
        dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            dict(model.named_parameters()), "conv1.weight", torch.arange(3), 1e-2)


def test_the_untraceable_model_reaches_the_fallback_through_cge():
    """The default oracle (feature reuse on) falls back to full forwards for a model without a graph or stages,
    and its CGE estimate equals the one with every strategy pinned to the loop."""
    model, x, y = _setup("inplace_resnet", True)
    params = dict(model.named_parameters())
    masks = {n: torch.rand(p.shape) < 4 / p.numel() for n, p in params.items()}  # about 4 coordinates per tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, masks=masks)
    loop = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y, fallback="loop"), params, masks=masks)
    assert auto.queries == loop.queries
    for name in params:
        # float64 losses that agree to ~1e-15 give forward differences that agree to ~1e-15 / mu = 2e-13
        torch.testing.assert_close(auto.grads[name], loop.grads[name], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("strategy", list(fallback.STRATEGIES))
def test_a_black_box_head_gets_the_same_outputs_from_every_strategy(strategy):
    model, x, y = _setup("inplace_resnet", False)
    head = nn.Softmax(dim=-1)  # a stand-in black box: it gets (K * B, 10) outputs, never under vmap
    loss = lambda probs, t: F.nll_loss(probs.log(), t)  # noqa: E731
    params = dict(model.named_parameters())
    index = torch.arange(4)
    oracle = dz.ModuleOracle(model, loss, x, y, feature_reuse=False, head=lambda out, _: head(out), fallback=strategy)
    got = oracle.coordinate_losses(params, "fc.weight", index, 1e-2)
    reference = dz.ModuleOracle(model, loss, x, y, feature_reuse=False, head=lambda out, _: head(out))
    want = torch.stack([reference.loss({**params, "fc.weight": w}) for w in _perturbed(params["fc.weight"], index)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _perturbed(value, index):
    for i in index.tolist():
        w = value.detach().clone()
        w.view(-1)[i] += 1e-2
        yield w


def test_steady_state_never_syncs():
    """After the choice, a chunk reads nothing back to the host (the trial's timing is the only sync)."""
    from benchmarks.cge_throughput import DispatchCounter

    model, x, y = InPlaceResNet().train(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("stem.0.weight", "layers.1.shortcut.0.weight"):  # vmap, then per-point inputs or the loop
            oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False)
            oracle.coordinate_losses(params, name, torch.arange(32), 1e-2)  # chooses for K = 32
            with DispatchCounter() as counter:
                oracle.coordinate_losses(params, name, torch.arange(32, 64), 1e-2)
            assert counter.syncs == 0, name


def test_a_bad_fallback_is_refused_before_work():
    model, x, y = _setup("gated_cnn", True, torch.float32)
    with pytest.raises(ValueError, match=r"`fallback` to be 'auto', 'first_working' or one of \['vmap', "
                                         r"'vmap_per_point', 'loop'\], but got 'fastest'"):
        dz.ModuleOracle(model, F.cross_entropy, x, y, fallback="fastest")
    with pytest.raises(ValueError, match="`trial_points` to be a positive int, but got 0"):
        fallback.FullForwards(trial_points=0)


def test_a_model_with_an_engine_takes_the_first_working_strategy_without_timing():
    """RGE on a traced model runs full forwards too; without timings, ranks and runs cannot choose differently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    params = dict(model.named_parameters())
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    first = dz.rge(oracle, params, q=6, generator=torch.Generator().manual_seed(0))
    assert fallback.choices(model) == {}
    pinned = dz.ModuleOracle(model, F.cross_entropy, x, y, fallback="vmap")
    second = dz.rge(pinned, params, q=6, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(first.grads[n], second.grads[n]) for n in params)  # vmap works here: it was taken


def test_choices_do_not_keep_a_model_alive():
    import gc
    import weakref

    model, x, y = _setup("gated_cnn", True, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False).coordinate_losses(
            dict(model.named_parameters()), "stem.0.weight", torch.arange(3), 1e-2)
    assert fallback.choices(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
