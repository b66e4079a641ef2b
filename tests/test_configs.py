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


def _tiny_overrides(path: Path) -> list[str]:
    """Shrink the heavy configs so that one step stays fast; the wiring under test is unchanged."""
    text = path.read_text()
    args = []
    if "CIFAR10DataModule" in text:
        args += ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    if "ResNetS" in text and "Classifier" in text.split("model:\n  class_path:")[1].split("\n")[0]:
        args += ["--model.init_args.model.init_args.num_blocks", "1"]
    if "DnCNN" in text and "CIFAR10" in text:
        args += ["--model.init_args.denoiser.init_args.width", "4"]
    if "dz_lightning.tasks.sol." in text:
        args += ["--data.init_args.resolution", "[8, 16]", "--data.init_args.factor", "2",
                 "--data.init_args.steps", "6", "--data.init_args.warmup", "3", "--data.init_args.window", "2",
                 "--data.init_args.batch_size", "2", "--data.init_args.train_re", "[100.0]",
                 "--data.init_args.test_re", "[150.0]", "--model.init_args.resolution", "[8, 16]"]
        if "corrector:" in text:
            args += ["--model.init_args.corrector.init_args.width", "1"]
    if "SimpleCNN" in text:
        args += ["--model.init_args.model.init_args.depth", "1"]
        if "estimator: rge" in text:
            args += ["--model.init_args.q", "730"]
    return args


def _stand_in_checkpoints(path: Path) -> None:
    """Write the classifier checkpoints a defense config expects (step 1 of its recipe), with random weights."""
    from dz_lightning.models import MLP, ResNetS

    text = path.read_text()
    for line in text.splitlines():
        if "checkpoint: checkpoints/" in line:
            target = Path(line.split("checkpoint:")[1].strip())
            model = ResNetS(3, 10) if "ResNetS" in text else MLP(64, (64,), 10)
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, target)


def test_every_config_is_covered():
    assert len(BASES) >= 10 and all(p.exists() for p in OVERLAYS.values())


@pytest.mark.parametrize("path", BASES, ids=[str(p.relative_to(ROOT / "configs")) for p in BASES])
def test_config_prints(path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", BASES, ids=[str(p.relative_to(ROOT / "configs")) for p in BASES])
def test_config_fast_dev_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_vision(monkeypatch, (3, 32, 32))
    _stand_in_checkpoints(path)
    torch.manual_seed(0)
    command = "test" if "SourceOnly" in path.read_text() else "fit"  # nothing to train in SRC
    cli = build_cli([command, "--config", str(path), "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
                     "--trainer.enable_progress_bar", "false", *_tiny_overrides(path)])
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


@pytest.mark.parametrize("path", BASES, ids=[str(p.relative_to(ROOT / "configs")) for p in BASES])
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
