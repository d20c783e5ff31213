"""Backend dispatch shared by every op.

An op lists its backends in priority order. ``choose_backend`` honours an explicit
``backend=`` argument, then the ``ATTNZOO_BACKEND`` environment variable, then walks
the list and takes the first backend whose ``can_run`` check passes. Each check
returns ``None`` when the backend can run, or a sentence naming the one condition
that failed, so a refused request explains itself.

Graph capture. ONNX export (``torch.onnx.export``, either exporter), ``torch.export`` and
``torch.compile`` (dynamo) trace the model in Python; the cpu backend's autograd
Functions and raw passes cannot be traced, so while a capture is in progress
(``capturing()``) only backends that declare they can be traced by it are eligible
(``Backend.traceable``): the plain-torch reference always, a Triton backend under
``torch.compile`` when its module registers its kernels as ``torch.library`` custom ops
(``register_compile_traceable``). A backend forced by ``backend=`` or
``$ATTNZOO_BACKEND`` that the capture cannot trace is replaced by the reference, because
the model would otherwise not export at all. Exports log the substitution (once per op);
a torch.compile trace cannot, since a logging call there is a graph break.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

_logger = logging.getLogger(__name__)

ENV_VAR = "ATTNZOO_BACKEND"

# Looked up once: dynamo cannot trace importlib, and choose_backend runs inside compiled code.
_HAS_TRITON = importlib.util.find_spec("triton") is not None

CAPTURES = ("onnx", "export", "compile")

# Triton backend modules whose public functions run through torch.library custom ops (with
# fake and autograd registrations), so torch.compile can trace them. A plain set: dynamo
# reads it as a constant while tracing choose_backend.
_COMPILE_TRACEABLE = set()


def register_compile_traceable(module_name: str) -> None:
    """Called by a Triton backend module once its custom ops are registered."""
    _COMPILE_TRACEABLE.add(module_name)


@dataclass(frozen=True)
class Backend:
    """A named implementation of an op and the check that says whether it can run."""

    name: str
    impl: object  # module or namespace that holds the op's primitives
    # (tensors, forced) -> None if it can run, else the reason it cannot
    can_run: Callable[[Sequence[torch.Tensor], bool], Optional[str]]
    # capture ("onnx" | "export" | "compile") -> whether it can trace this backend;
    # None: only a backend named "reference" (plain torch) can be traced
    traceable: Optional[Callable[[str], bool]] = None

    def can_trace(self, capture: str) -> bool:
        if self.traceable is None:
            return self.name == "reference"
        return self.traceable(capture)


def capturing() -> Optional[str]:
    """The graph capture in progress: ``"onnx"``, ``"export"``, ``"compile"``, or None in eager mode.

    ONNX first: the dynamo-based ONNX exporter runs under ``torch.export`` too, and its
    graph must hold ONNX-translatable ops only, which a custom op is not.
    """
    if torch.onnx.is_in_onnx_export():
        return "onnx"
    if getattr(torch.compiler, "is_exporting", lambda: False)():  # torch >= 2.5
        return "export"
    if torch.compiler.is_compiling():
        return "compile"
    return None


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def no_autocast(device_type: str):
    """Autocast off for ``device_type`` (a no-op where autocast does not exist, e.g. meta).

    Every op runs its backends inside this, forward and backward: the op sets its own precision
    (half inputs accumulate in fp32), and autocast would otherwise round some of a backend's
    matmuls to half and not others, leaving saved tensors in another dtype than the backward's."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
    if not _HAS_TRITON:
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
    capture = capturing()
    if capture is not None:
        return _choose_traceable(op, backends, tensors, requested, capture)
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


def _choose_traceable(op, backends, tensors, requested, capture) -> Backend:
    """``choose_backend`` during a graph capture: the same order, traceable backends only."""
    by_name = {b.name: b for b in backends}
    if requested is not None:
        if requested not in by_name:
            raise ValueError(f"{op}: unknown backend {requested!r}; choose from {sorted(by_name)}")
        chosen = by_name[requested]
        if chosen.can_trace(capture) and chosen.can_run(tensors, True) is None:
            return chosen
        if "reference" not in by_name:
            raise RuntimeError(f"{op}: backend {requested!r} cannot be traced by {capture} and the op has no reference")
        _log_substitution(op, requested, capture, warn=True)
        return by_name["reference"]
    eager = next((b.name for b in backends if b.can_run(tensors, False) is None), None)
    for b in backends:
        if b.can_trace(capture) and b.can_run(tensors, False) is None:
            if b.name != eager:
                _log_substitution(op, None, capture, chosen=b.name)
            return b
    raise RuntimeError(f"{op}: no backend can be traced by {capture}: "
                       + ", ".join(b.name for b in backends))


_LOGGED = set()


def _log_substitution(op, requested, capture, warn=False, chosen="reference"):
    # dynamo would graph-break on a logging call (fullgraph=True: an error); the substitution is
    # reported when exporting, where the tracer runs plain Python
    key = (op, requested, capture, chosen)
    if capture == "compile" or key in _LOGGED:
        return
    _LOGGED.add(key)  # once per op and capture, not once per layer
    if warn:
        _logger.warning("%s: backend %r cannot be traced by %s; using the reference backend", op, requested, capture)
    else:
        _logger.info("%s: tracing for %s, using the %s backend", op, capture, chosen)


def _triton_traceable(module_name: str) -> Callable[[str], bool]:
    """torch.compile traces a Triton backend whose module registered its custom ops; the ONNX
    exporters and torch.export get only ops with an ONNX translation, which a custom op lacks."""

    def traceable(capture: str) -> bool:
        return capture == "compile" and module_name in _COMPILE_TRACEABLE

    return traceable


def standard_backends(reference, cpu=None, triton_module_name: Optional[str] = None) -> list:
    """Priority order used by every op: triton (GPU), cpu fast path, reference.

    An op without a cpu fast path or Triton kernels passes None for it and gets the others.
    The Triton module is imported only where it can run (triton installed, CUDA present),
    so that ``import attnzoo`` never needs triton; elsewhere on first use (the interpreter).
    """
    backends = [Backend("reference", reference, can_run_reference)]
    if cpu is not None:
        backends.insert(0, Backend("cpu", cpu, can_run_cpu))
    if triton_module_name is None:
        return backends

    class _LazyTriton:
        def __getattr__(self, item):
            # sys.modules first: dynamo traces a dict lookup but refuses importlib
            module = sys.modules.get(triton_module_name)
            if module is None:
                module = importlib.import_module(triton_module_name)
            return getattr(module, item)

    if _HAS_TRITON and torch.cuda.is_available():
        # imported now, not at first use: a torch.compile trace cannot import it, and the
        # import is what registers its custom ops (``register_compile_traceable``)
        try:
            importlib.import_module(triton_module_name)
        except Exception as e:  # a broken triton install must not break `import attnzoo`
            _logger.warning("could not import %s (%s); its op runs without it", triton_module_name, e)
    return [Backend("triton", _LazyTriton(), can_run_triton, _triton_traceable(triton_module_name)), *backends]
