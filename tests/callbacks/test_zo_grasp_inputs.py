"""ZOGraSP refuses LPR files and `dense` names that would silently freeze or ignore layers."""

from __future__ import annotations

import json
from collections.abc import Callable

import lightning as L
import pytest
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import ZOClassifier

from dz_lightning.models import MLP


def _setup(tiny_trainer: Callable[..., L.Trainer], callback: ZOGraSP) -> ZOGraSP:
    module = ZOClassifier(MLP(hidden=(16,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    callback.setup(tiny_trainer(), module, "fit")  # setup reads the module (and the trainer's loggers, none here)
    return callback


def _lpr(tmp_path, content) -> str:
    path = tmp_path / "lpr.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_lpr_file_that_freezes_every_weight_is_refused(tiny_trainer, tmp_path):
    path = _lpr(tmp_path, {"1.weight": 1.0, "3.weight": 1.0})
    with pytest.raises(ValueError, match=r"lpr\.json' prunes every coordinate of every prunable layer"):
        _setup(tiny_trainer, ZOGraSP(sparsity=0.9, ratios_path=path))


def test_lpr_file_that_is_not_json_or_out_of_range_is_named(tiny_trainer, tmp_path):
    with pytest.raises(ValueError, match=r"LPR file '.*lpr\.json' is not valid JSON.*\['1\.weight', '3\.weight'\]"):
        _setup(tiny_trainer, ZOGraSP(ratios_path=_lpr(tmp_path, "1.weight: 0.9")))
    with pytest.raises(ValueError, match=r"lpr\.json' holds pruning ratios outside \[0, 1\]: \{'3\.weight': 1\.5\}"):
        _setup(tiny_trainer, ZOGraSP(ratios_path=_lpr(tmp_path, {"1.weight": 0.9, "3.weight": 1.5})))


def test_lpr_file_that_freezes_a_layer_or_misses_the_sparsity_warns(tiny_trainer, tmp_path):
    path = _lpr(tmp_path, {"1.weight": 0.5, "3.weight": 1.0})
    with pytest.warns(UserWarning, match=r"freezes \['3\.weight'\]"), \
            pytest.warns(UserWarning, match=r"prunes 0\.5.* but the callback's sparsity is 0\.9"):
        cb = _setup(tiny_trainer, ZOGraSP(sparsity=0.9, ratios_path=path))
    assert cb.ratios == {"1.weight": 0.5, "3.weight": 1.0}


def test_dense_names_must_exist(tiny_trainer):
    with pytest.raises(ValueError, match=r"`dense` to name parameters of MLP, but \['3\.wieght'\] is not among them"):
        _setup(tiny_trainer, ZOGraSP(dense=["3.wieght"]))
    with pytest.raises(TypeError, match="`dense` to be a list of parameter names"):
        ZOGraSP(dense="3.weight")
    assert _setup(tiny_trainer, ZOGraSP(dense=["3.weight"])).prunable_names == ["1.weight"]
    assert ZOGraSP().prunable_names is None  # known after setup only
