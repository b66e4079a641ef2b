"""A DDP strategy for zeroth-order training: Lightning's process groups, launchers and samplers, no DDP wrapper.

ZO training never calls ``backward``, so ``DistributedDataParallel`` has nothing to synchronize (its gradient
hooks never fire) and refuses modules whose parameters do not require gradients. ``ZODDPStrategy`` keeps
everything else of Lightning's ``DDPStrategy`` (NCCL on GPUs, Gloo on CPUs, torchrun/SLURM environments,
``num_nodes``) and only replaces the wrapping with one broadcast of rank 0's parameters and buffers.

YAML::

    trainer:
      devices: 2
      use_distributed_sampler: false   # every rank must see the same batch
      strategy:
        class_path: dz_lightning.strategies.ZODDPStrategy
        init_args: {process_group_backend: gloo}

or ``strategy: zo_ddp`` (registered with Lightning's ``StrategyRegistry``; the backend then follows the accelerator).
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

__all__ = ["ZODDPStrategy"]


class ZODDPStrategy(DDPStrategy):
    """``DDPStrategy`` without the ``DistributedDataParallel`` wrapper (see the module docstring)."""

    strategy_name = "zo_ddp"

    @override
    def configure_ddp(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)


# `Trainer(strategy="zo_ddp")` (or `strategy: zo_ddp` in YAML) once this module is imported (dz_lightning.module does)
if ZODDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(ZODDPStrategy.strategy_name, ZODDPStrategy,
                              description="DDP without the DistributedDataParallel wrapper, for zeroth-order training")
