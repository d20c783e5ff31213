"""Backend dispatch shared by every op.

An op lists its backends in priority order. ``choose_backend`` honours an explicit
``backend=`` argument, then the ``ATTNZOO_BACKEND`` environment variable, then walks
the list and takes the first backend whose ``can_run`` check passes. Each check
returns ``None`` when the backend can run, or a sentence naming the one condition
that failed, so a refused request explains itself.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

_logger = logging.getLogger(__name__)

ENV_VAR = "ATTNZOO_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A named implementation of an op and the check that says whether it can run."""

    name: str
    impl: object  # module or namespace that holds the op's primitives
    # (tensors, forced) -> None if it can run, else the reason it cannot
    can_run: Callable[[Sequence[torch.Tensor], bool], Optional[str]]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_reference(tensors: Sequence[torch.Tensor], forced: bool = False) -> Optional[str]:
    return None


def can_run_cpu(tensors: Sequence[torch.Tensor], forced: bool = False) -> Optional[str]:
    for t in tensors:
        if t.device.type != "cpu":
            return f"cpu backend needs CPU tensors, got a tensor on {t.device}"
    return None


def can_run_triton(tensors: Sequence[torch.Tensor], forced: bool = False) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    devices = {t.device.type for t in tensors}
    if triton_interpreting():
        # The interpreter is a test tool: slow, so never picked automatically.
        if not forced:
            return "TRITON_INTERPRET=1 is only used when backend='triton' is requested"
        if devices != {"cpu"}:
            return f"TRITON_INTERPRET=1 runs on CPU tensors, got devices {sorted(devices)}"
        return None
    if devices != {"cuda"}:
        return f"triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got devices {sorted(devices)}"
    return None


def choose_backend(
        op: str,
        backends: Sequence[Backend],
        tensors: Sequence[torch.Tensor],
        backend: Optional[str] = None,
) -> Backend:
    """Return the backend to run ``op`` on ``tensors``.

    ``backend`` (or ``$ATTNZOO_BACKEND``) forces one; a forced backend that cannot run
    raises ``RuntimeError`` with its reason rather than silently falling back.
    """
    by_name = {b.name: b for b in backends}
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in by_name:
            raise ValueError(f"{op}: unknown backend {requested!r}; choose from {sorted(by_name)}")
        chosen = by_name[requested]
        reason = chosen.can_run(tensors, True)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run: {reason}")
        return chosen
    reasons = []
    for b in backends:
        reason = b.can_run(tensors, False)
        if reason is None:
            _logger.debug("%s: using backend %s", op, b.name)
            return b
        reasons.append(f"{b.name}: {reason}")
    raise RuntimeError(f"{op}: no backend can run: " + "; ".join(reasons))


def standard_backends(reference, cpu, triton_module_name: str) -> list:
    """Priority order used by every op: triton (GPU), cpu fast path, reference.

    The Triton module is imported lazily so that ``import attnzoo`` never needs triton.
    """

    class _LazyTriton:
        def __getattr__(self, item):
            return getattr(importlib.import_module(triton_module_name), item)

    return [
        Backend("triton", _LazyTriton(), can_run_triton),
        Backend("cpu", cpu, can_run_cpu),
        Backend("reference", reference, can_run_reference),
    ]
