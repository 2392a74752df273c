"""Checking a device a model is asked to live on: it must exist here and hold weights."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that cannot hold the model here."""


def check_device(device: str | torch.device | None, flag: str | None = None) -> str:
    """``device`` as a name torch takes (None: a GPU when there is one, else the CPU); a ``DeviceError`` says why
    not, naming the command-line ``flag`` when given (else the ``device=`` argument)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def opt(value) -> str:
        return f"{flag} {value}" if flag else f"device={str(value)!r}"

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{opt(device)}: not a device name; use cpu, cuda or cuda:N") from None
    name = str(device)
    if parsed.type == "cpu":
        return name
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{opt(name)}: CUDA is not available on this machine (no GPU, or torch {torch.__version__} was built "
                f"without CUDA); use {opt('cpu')}"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{opt(name)}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return name
    if parsed.type == "meta":
        why = "holds no weights (it only describes shapes)"
    elif parsed.type == "mps" and torch.backends.mps.is_available():  # its prefill kernel is the CPU's (CPU only)
        why = "is not supported by kimivl"
    else:
        why = "is not available here"
    raise DeviceError(f"{opt(name)}: {parsed.type} {why}; use {opt('cpu')} or cuda")
