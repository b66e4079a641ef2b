"""The three task oracles on fake CUDA tensors (the harness of ``tests/dz_lightning/test_fake_cuda.py``).

Each task's ``make_oracle`` (classification, black-box defense with a residual and a plain denoiser) or oracle
(SOL) runs on ``FakeTensorMode`` CUDA tensors: networks and batches are made under ``torch.device("cuda")``, the
calls run without it, so a CPU tensor the library makes beside them raises a device mismatch, and every host read
is answered with 0 and counted. As there, feature reuse runs with ``self_check=False`` (the self-check reads values).

Calls per oracle (3): ``oracle.loss``, ``dz.cge`` with coordinates of the first and last weight, ``dz.rge``.
Building the oracle (``make_oracle``, the defense's targets ``f(x).argmax``) reads nothing from the device. SOL runs
PhiFlow's first solver step on the fake device up to its pressure solve, whose sparse matrix fake tensors cannot
make (strict xfail below, with the exact call and error).
"""

from __future__ import annotations

import pytest
import torch
from dz_lightning.tasks.classification import ZOClassifier
from dz_lightning.tasks.defense import BlackBoxClassifier, ZODenoisedSmoothing
from fake_cuda import _AnswerHostReads, _fake_cuda
from torch import Tensor, nn

import dz_lightning as dz
from dz_lightning.models import MLP, DnCNN, SOLCorrector

CERT = {"n0": 10, "n": 50, "alpha": 0.01, "max_certified": 4, "certify_batch": 50}
SOL_RES = (8, 16)  # the smallest grid of tests/tasks/test_sol.py

TASKS = ["classification", "defense_residual", "defense_plain", "sol"]
CALLS = ["loss", "cge_coordinates", "rge"]

# the most host reads each call may make (the engine's bounds of tests/dz_lightning/test_fake_cuda.py)
MAX_READS = {"loss": 0, "cge_coordinates": 3, "rge": 1}

# (task, call) -> why it cannot run on fake CUDA tensors (strict xfail: a fix must remove the entry)
_SOL_SPARSE_SOLVE = (
    "fake tensors only: the pressure solve of KarmanSolver._step (phi.physics.fluid.make_incompressible -> "
    "phiml.math.solve_linear -> phiml's native_matrix -> TorchBackend.csr_matrix) builds its matrix with "
    "torch.sparse_csr_tensor(..., device='cuda:0'); FakeTensorMode finds no working meta kernel for "
    "aten.sparse_compressed_tensor (comp_plain_value_size) and its attempt to run the op raises RuntimeError "
    "'Found no NVIDIA driver on your system'. "
    "Everything before it in the first solver step (resampling, explicit diffusion, inflow, semi-Lagrangian "
    "advection, the solve's setup) runs on the fake device with no host read")
XFAIL: dict[tuple[str, str], str] = {("sol", call): _SOL_SPARSE_SOLVE for call in CALLS}


def _oracle(task: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dz.Oracle, dict[str, Tensor]]:
    """The task's oracle on a fake CUDA batch of 2, and the parameters it is a function of."""
    torch.manual_seed(0)
    if task == "classification":
        with torch.device("cuda"):
            model = MLP(64, (16,), 10)
            x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
        module = ZOClassifier(model)
        return module.make_oracle((x, y)), {n: p.detach() for n, p in module.zo_parameters().items()}
    if task.startswith("defense"):
        with torch.device("cuda"):
            # the black box's fn is a torch module on the fake device: a NumPy black box (test_defense's
            # _NumpyBlackBox) cannot run here, fake tensors have no data to hand to NumPy
            classifier = MLP(64, (16,), 10).eval()
            denoiser = (DnCNN(1, 2, 3) if task == "defense_residual" else
                        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1)))
            x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
        module = ZODenoisedSmoothing(denoiser, BlackBoxClassifier(fn=classifier), max_batch=7, **CERT)
        return module.make_oracle((x, y)), {n: p.detach() for n, p in module.zo_parameters().items()}
    from dz_lightning.tasks.karman import KarmanSolver
    from dz_lightning.tasks.sol import SOLOracle
    from phiml.backend import ComputeDevice
    from phiml.backend.torch import TORCH, _torch_backend

    # what PhiFlow picks on a GPU machine: its torch backend makes new tensors (grids, constants) on cuda:0 when
    # torch.cuda.device_count() > 0 at import; here it found none and chose the CPU
    monkeypatch.setattr(TORCH, "_default_device", ComputeDevice(TORCH, "fake", "GPU", 80 << 30, 132, "fake",
                                                                ref="cuda:0"))
    # phiml's JITFunction pushes itself on CURRENT_JIT_CALLS while it traces and pops only when tracing succeeds: a
    # trace that raises (as here) would leave every later PhiFlow jit of this process running eagerly ("nested")
    monkeypatch.setattr(_torch_backend, "CURRENT_JIT_CALLS", [])
    solver = KarmanSolver(SOL_RES)  # its grids (inflow, template) on PhiFlow's default device
    with torch.device("cuda"):
        corrector = SOLCorrector(width=2)
        windows = torch.randn(2, 3, 2, *SOL_RES)  # (B, m + 1, 2, X, Y): two corrected steps
        re = torch.tensor([100.0, 200.0])
    return SOLOracle(corrector, solver, windows, re, max_batch=8), {
        n: p.detach() for n, p in corrector.named_parameters()}


def _run(call: str, oracle: dz.Oracle, params: dict[str, Tensor], answers: _AnswerHostReads) -> None:
    names = [n for n, p in params.items() if p.dim() > 1]
    first, last = names[0], names[-1]
    sub = {first: params[first], last: params[last]}
    index = {n: torch.tensor([0, params[n].numel() - 1], device="cuda") for n in sub}
    if isinstance(oracle, dz.ModuleOracle):
        oracle.self_check = False  # the feature-reuse engine's self-check compares values (allclose)
    with answers:
        if call == "loss":
            out = oracle.loss(params)
            assert out.shape == () and out.device.type == "cuda"
        elif call == "cge_coordinates":
            est = dz.cge(oracle, sub, coordinates=index)
            assert est.queries == 5 and est.grads[first].device.type == "cuda"
        elif call == "rge":
            est = dz.rge(oracle, sub, q=4, chunk=2)
            assert est.queries == 5 and est.grads[last].device.type == "cuda"


@pytest.mark.filterwarnings("ignore:There is a performance drop")
# torchmetrics deep-copies its fake states when ZOClassifier builds its metrics inside the mode
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("task", TASKS)
def test_task_oracle_runs_on_fake_cuda(task, call, monkeypatch, request):
    if (task, call) in XFAIL:
        request.applymarker(pytest.mark.xfail(reason=XFAIL[task, call], strict=True, raises=RuntimeError))
    with _fake_cuda(monkeypatch) as (_, answers):
        with answers:  # building the oracle reads nothing either (the defense's targets: f(x).argmax on the device)
            oracle, params = _oracle(task, monkeypatch)
        assert not answers.reads, f"host reads while building the oracle: {dict(answers.reads)}"
        _run(call, oracle, params, answers)
    reads = sum(answers.reads.values())
    assert reads <= MAX_READS[call], f"{reads} host reads: {dict(answers.reads)}"
