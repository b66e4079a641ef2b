"""Networks that expose their stages for feature reuse."""

from dz_lightning.models.corrector import SOLCorrector, SOLResNet
from dz_lightning.models.dncnn import DnCNN
from dz_lightning.models.mlp import MLP
from dz_lightning.models.resnet import ResNetS, resnet20, resnet32, resnet44, resnet56, resnet110
from dz_lightning.models.simple_cnn import SimpleCNN, simple_cnn

__all__ = [
    "DnCNN", "MLP", "ResNetS", "SOLCorrector", "SOLResNet", "SimpleCNN",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "simple_cnn",
]
