"""A classifier that can only be queried (the defense's black box), and loading its weights from a checkpoint."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from dz_lightning.checkpointing import verify_checksum

__all__ = ["BlackBoxClassifier", "load_state_dict"]


def load_state_dict(path: str | Path, argument: str = "checkpoint") -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read without running any code stored in the file.

    ``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers, so a crafted file (a pickle
    whose ``__reduce__`` calls ``os.system``, say) is refused instead of executed.

    Args:
        path: the checkpoint file.
        argument: the argument that named it (for the error message).

    Raises:
        ValueError: the file holds other Python objects, or has no ``state_dict`` of tensors.
    """
    verify_checksum(path)  # a `.sha256` written beside it by `dz` must match (flipped bytes are named, not loaded)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, zipfile.BadZipFile) as err:
        raise ValueError(f"corrupted or truncated checkpoint {str(path)!r} given as `{argument}` "
                         f"({type(err).__name__}); use another checkpoint.") from err
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Refusing to load `{argument}` {str(path)!r}: it holds Python objects other than tensors and plain "
            f"containers, which could run code when unpickled ({reason}). Load only checkpoints you trust; export "
            "the weights (`{'state_dict': model.state_dict()}`) in a trusted session to use this one."
        ) from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Expected `{argument}` {str(path)!r} to be a Lightning checkpoint with a 'state_dict' of "
                         f"tensors, but it holds {type(checkpoint).__name__}"
                         f"{' with keys ' + str(sorted(checkpoint)[:8]) if isinstance(checkpoint, dict) else ''}.")
    return state


class BlackBoxClassifier:
    """A classifier that can only be queried: images in, logits out, no gradients, every image counted.

    Exactly one source: ``model`` (an architecture) plus ``checkpoint`` (a Lightning checkpoint whose
    ``state_dict`` holds it under ``prefix``), a ``torchscript`` file, or a Python callable ``fn``.
    It is deliberately not an ``nn.Module``: no parameter of it can be reached by an optimizer or by autograd.

    Args:
        model: architecture whose weights come from ``checkpoint``.
        checkpoint: path of a ``.ckpt`` file.
        prefix: key prefix of the model's weights in the checkpoint (``"model."`` for the task modules).
        torchscript: path of a TorchScript file.
        fn: a callable ``images -> logits``.
        num_classes: expected width of the logits.
    """

    def __init__(self, model: nn.Module | None = None, checkpoint: str | None = None, prefix: str = "model.",
                 torchscript: str | None = None, fn: Callable[[Tensor], Tensor] | None = None,
                 num_classes: int = 10) -> None:
        given = [s for s, v in (("model+checkpoint", checkpoint), ("torchscript", torchscript), ("fn", fn))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"Expected exactly one of `checkpoint` (with `model`), `torchscript` or `fn`, but got "
                             f"{given or 'none'}.")
        if checkpoint is not None:
            if model is None:
                raise ValueError("Expected argument `model` (the architecture) together with `checkpoint`.")
            state = load_state_dict(checkpoint, "checkpoint")
            model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            fn = model.eval()
        elif torchscript is not None:
            fn = torch.jit.load(torchscript, map_location="cpu").eval()
        if isinstance(fn, nn.Module):
            fn.requires_grad_(False)
            self._module: nn.Module | None = fn
        else:
            self._module = None
        self._fn = fn
        self.num_classes = num_classes
        self.queries = 0

    def to(self, device: torch.device | str) -> BlackBoxClassifier:
        """Move the wrapped model (if any) to ``device``."""
        if self._module is not None:
            self._module.to(device)
        return self

    def __call__(self, images: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, C, H, W)``; detached, no graph."""
        with torch.no_grad():
            out = self._fn(images.detach())
        if not isinstance(out, Tensor) or out.shape != (images.shape[0], self.num_classes):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"The black-box classifier must return logits of shape ({images.shape[0]}, "
                             f"{self.num_classes}), but returned {shape}.")
        self.queries += images.shape[0]
        return out.detach()
