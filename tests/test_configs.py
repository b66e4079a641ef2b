"""Every config under configs/ parses and runs a fast_dev_run on tiny stand-in data (never downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import datasets

from dz_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# overlays (e.g. *_ddp.yaml) are combined with the config they extend
OVERLAYS = {p: ROOT / "configs" / p.parent.name / p.name.replace("_ddp", "") for p in CONFIGS if "_ddp" in p.stem}
BASES = [p for p in CONFIGS if p not in OVERLAYS]


def _fake_vision(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int]) -> None:
    def fake(root, train=True, transform=None, download=False):  # noqa: ARG001 - torchvision's signature
        return datasets.FakeData(size=16, image_size=shape, num_classes=10, transform=transform,
                                 random_offset=0 if train else 100)

    for name in ("CIFAR10", "MNIST", "FashionMNIST"):
        monkeypatch.setattr(datasets, name, fake)


TINY = ROOT / "tests" / "configs"
CIFAR_RESNET = ("cifar10_small_batches", "resnet20_one_block")
SOL_CORRECTOR = ("sol_tiny_grid", "sol_corrector_narrow")
# the committed overlays (tests/configs/NAME.yaml) that shrink each config so that one step stays fast; the wiring
# under test is unchanged. A new config must be listed here (test_every_config_is_covered).
SHRINK: dict[str, tuple[str, ...]] = {
    "classification/digits.yaml": (),
    "classification/digits_fo.yaml": (),
    "classification/digits_rge.yaml": (),
    "classification/digits_zo_grasp90.yaml": (),
    "classification/resnet20_cifar10_fo.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_fo_sparse_gradients90.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_fo_sparse_weights90.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_zo_grasp80.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_zo_grasp90.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_zo_grasp95.yaml": CIFAR_RESNET,
    "classification/resnet20_cifar10_zo_grasp99.yaml": CIFAR_RESNET,
    "classification/simple_cnn_cifar10_cge.yaml": ("cifar10_small_batches", "simple_cnn_one_layer"),
    "classification/simple_cnn_cifar10_fo.yaml": ("cifar10_small_batches", "simple_cnn_one_layer"),
    "classification/simple_cnn_cifar10_rge.yaml": ("cifar10_small_batches", "simple_cnn_one_layer", "rge_q730"),
    "defense/blackbox_digits.yaml": (),
    "defense/cifar10_zo_ds_resnet20.yaml": ("cifar10_small_batches", "dncnn_narrow"),
    "defense/fo_ds_digits.yaml": (),
    "defense/zo_ds_digits.yaml": (),
    "sol/fo_sol.yaml": SOL_CORRECTOR,
    "sol/fo_sol_sparse.yaml": SOL_CORRECTOR,
    "sol/non.yaml": SOL_CORRECTOR,
    "sol/src.yaml": ("sol_tiny_grid",),
    "sol/zo_sol.yaml": SOL_CORRECTOR,
    "sol/zo_sol_paper_gpu.yaml": SOL_CORRECTOR,
}


def _name(path: Path) -> str:
    return path.relative_to(ROOT / "configs").as_posix()


def _tiny_configs(path: Path) -> list[str]:
    """``--config`` arguments: the config, its shrinking overlays, then one fast_dev_run batch on the CPU."""
    args = ["--config", str(path)]
    for overlay in (*SHRINK[_name(path)], "fast_dev_run"):
        args += ["--config", str(TINY / f"{overlay}.yaml")]
    return args


def _load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _instantiate(spec: dict) -> torch.nn.Module:
    import importlib

    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args") or {})


def _stand_in_checkpoints(node: object) -> None:
    """Write the classifier checkpoints a defense config expects (step 1 of its recipe), with random weights.

    Every ``checkpoint: checkpoints/...`` (or ``X_checkpoint``) gets the network its sibling ``model`` (or
    ``X_model``) describes.
    """
    if isinstance(node, list):
        for item in node:
            _stand_in_checkpoints(item)
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key.endswith("checkpoint") and isinstance(value, str) and value.startswith("checkpoints/"):
            model = _instantiate(node[key.removesuffix("checkpoint") + "model"])
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, value)
        else:
            _stand_in_checkpoints(value)


def test_every_config_is_covered():
    assert len(BASES) >= 10 and all(p.exists() for p in OVERLAYS.values())
    assert set(SHRINK) == {_name(p) for p in BASES}, "list a new config's shrinking overlays in SHRINK"
    used = {o for overlays in SHRINK.values() for o in overlays} | {"fast_dev_run"}
    assert used == {p.stem for p in TINY.glob("*.yaml")}, "every committed overlay is used, and exists"


@pytest.mark.parametrize("path", BASES, ids=[_name(p) for p in BASES])
def test_config_prints(path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", BASES, ids=[_name(p) for p in BASES])
def test_config_fast_dev_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_vision(monkeypatch, (3, 32, 32))
    config = _load(path)
    _stand_in_checkpoints(config["model"])
    torch.manual_seed(0)
    command = "test" if config["model"]["class_path"].endswith(".SourceOnly") else "fit"  # nothing to train in SRC
    cli = build_cli([command, *_tiny_configs(path)])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == (1 if command == "fit" else 0)


@pytest.mark.parametrize("overlay", list(OVERLAYS), ids=[p.name for p in OVERLAYS])
def test_ddp_overlay_prints_with_its_base(overlay, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(OVERLAYS[overlay]), "--config", str(overlay), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "ZODDPStrategy" in out and "use_distributed_sampler: false" in out


def _checkpoint_callbacks(path: Path) -> list[dict]:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    return [c.get("init_args") or {} for c in (cfg.get("trainer") or {}).get("callbacks") or []
            if c["class_path"].endswith("ModelCheckpoint")]


# configs whose last.ckpt another config reads by path (step 1 of the defense recipes) keep a fixed folder
PRODUCERS = {"blackbox_digits.yaml", "resnet20_cifar10_fo.yaml"}


@pytest.mark.parametrize("path", BASES, ids=[_name(p) for p in BASES])
def test_config_keeps_the_end_of_training_in_its_own_run(path):
    callbacks = _checkpoint_callbacks(path)
    if "SourceOnly" in path.read_text():  # nothing to train
        return
    last = [c for c in callbacks if c.get("filename") == "last" and not c.get("monitor")]
    assert len(last) == 1, "every config saves last.ckpt from a callback without a monitor (the end of training)"
    assert not any(c.get("save_last") and c.get("monitor") for c in callbacks), "save_last + monitor = best, not last"
    if path.name in PRODUCERS:
        assert all(c.get("dirpath") and c.get("enable_version_counter") is False for c in callbacks)
    else:
        assert not any(c.get("dirpath") for c in callbacks), "checkpoints belong in the run's version folder"
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert not any("ZOGraSP" in c["class_path"] for c in cfg["trainer"].get("callbacks") or [])
    assert ("zo_grasp" in cfg) == ("ZOGraSP" in path.read_text()), "ZO-GraSP is configured under `zo_grasp`"
