"""The one private API of torch that the engine relies on, behind one function with a test of its own.

``Tensor._version`` is torch's in-place version counter: it grows with every in-place write to a tensor. No public
API says whether a tensor was written in place since it was last seen, and two caches need exactly that: the
coordinates of a mask (:func:`dz_lightning.estimators.mask_coordinates`, searched once per mask, not per step) and
a :class:`~dz_lightning.ModuleOracle`'s feature-reuse engine (rebuilt when a parameter changes in place).
``tests/dz_lightning/test_upstream.py`` fails if torch changes it.

The private Lightning APIs the project still uses live in :mod:`dz_lightning.checkpointing`
(``ModelCheckpoint._generate_state_key``, the fit loop's ``batch_progress``) and :mod:`dz_lightning.cli`
(``LightningCLI._parse_ckpt_path``); the same test file checks them.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["tensor_version"]


def tensor_version(tensor: Tensor) -> int:
    """``tensor``'s in-place version: it grows with every in-place write to it (or to a view of it)."""
    return tensor._version
