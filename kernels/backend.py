"""Which implementation runs a decode call: compiled Triton, the Triton interpreter, or torch."""

from __future__ import annotations

import enum
import os

import torch

__all__ = ["Backend", "select_backend", "interpreter_enabled"]


class Backend(str, enum.Enum):
    """Implementation that executes a plan."""

    TRITON = "triton"  #: compiled Triton kernels on a CUDA device
    TRITON_INTERPRETER = "triton-interpreter"  #: the same kernels run by Triton's CPU interpreter
    TORCH = "torch"  #: torch operations (kernels.reference.torch_tree_decode)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (it must be set before ``triton`` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def select_backend(device: torch.device | str, requested: str = "auto") -> Backend:
    """Pick the backend for tensors on ``device``.

    ``requested`` is ``"auto"``, ``"triton"`` or ``"torch"``. With ``"auto"``: CUDA
    tensors run compiled Triton; CPU tensors run the Triton interpreter when it is
    enabled, else torch. ``"triton"`` on a CPU tensor needs the interpreter.
    """
    device = torch.device(device)
    requested = str(requested).lower()
    if requested not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {requested!r}")
    if requested == "torch":
        return Backend.TORCH
    if device.type == "cuda":
        return Backend.TRITON
    if interpreter_enabled():
        return Backend.TRITON_INTERPRETER
    if requested == "triton":
        raise ValueError(
            f"backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set "
            "before triton is imported"
        )
    return Backend.TORCH
