"""Networks for ZO training: staged ones (``stages()``) and plain ones that get feature reuse from their traced
graphs (U-Net, torchvision adaptations)."""

from dz_lightning.models.corrector import SOLCorrector, SOLResNet
from dz_lightning.models.dncnn import DnCNN
from dz_lightning.models.mlp import MLP
from dz_lightning.models.resnet import ResNetS, resnet20, resnet32, resnet44, resnet56, resnet110
from dz_lightning.models.simple_cnn import SimpleCNN, simple_cnn
from dz_lightning.models.tv import tv_mobilenet_v3_small, tv_resnet18
from dz_lightning.models.unet import UNetSmall, unet_small

__all__ = [
    "DnCNN", "MLP", "ResNetS", "SOLCorrector", "SOLResNet", "SimpleCNN", "UNetSmall",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "simple_cnn", "tv_mobilenet_v3_small", "tv_resnet18",
    "unet_small",
]
