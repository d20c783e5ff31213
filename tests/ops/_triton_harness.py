"""Where Triton kernel tests run, shared by the ``test_*_triton.py`` files.

Decided once at import of a test module:

- in that process on CPU tensors, when the Triton interpreter is active;
- in that process on CUDA tensors, when a GPU is present and TRITON_INTERPRET is unset;
- otherwise in a child ``pytest`` of the module with ``TRITON_INTERPRET=1``
  (its ``test_kernels_in_interpreter_subprocess``; the other tests are then not collected).

Why a child process: Triton reads TRITON_INTERPRET when a function is decorated with
``@triton.jit``, and that includes its own library functions (``tl.sum``, ``tl.max``),
decorated when ``triton.language`` is first imported. ``import timm`` (hence
``import attnzoo``) already imports triton, so in a full test run the flag is always too
late in-process; setting it at collection would also leak into every later test module.
For fast iteration on one file: ``TRITON_INTERPRET=1 pytest tests/ops/test_<op>_triton.py``.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch


def _interpreter_active() -> bool:
    lang = sys.modules.get("triton.language")
    if lang is None:  # not imported yet: the environment decides
        return os.environ.get("TRITON_INTERPRET") == "1"
    return type(lang.sum).__name__ == "InterpretedFunction"


def kernel_device(child_flag: str) -> Optional[str]:
    """"cpu" (interpreter), "cuda", or None when the module must rerun in a child process."""
    if _interpreter_active():
        return "cpu"
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        return "cuda"
    if os.environ.get(child_flag):
        raise RuntimeError("TRITON_INTERPRET=1 did not take effect in the child process")
    return None


def run_in_interpreter(test_file: str, child_flag: str, timeout: int = 600) -> str:
    """Run ``test_file`` in a child pytest with the interpreter on; return its summary line."""
    import attnzoo

    root = Path(attnzoo.__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", **{child_flag: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "interpreter run failed:\n" + out[-12000:]
    return out.strip().splitlines()[-1]


def poison_empty(monkeypatch, module) -> None:
    """Make ``module``'s ``torch.empty``/``empty_like`` return NaN (or a far-off index), so an
    element a kernel does not write cannot pass by reusing memory an earlier call left behind."""

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 2 ** 30)

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison(torch.empty(*args, **kwargs))

        @staticmethod
        def empty_like(*args, **kwargs):
            return poison(torch.empty_like(*args, **kwargs))

    monkeypatch.setattr(module, "torch", _Torch())


def kernel_module(test_file: str, child_flag: str, triton_module: str, timeout: int = 600):
    """The per-file plumbing of a ``test_*_triton.py`` module:
    ``DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(...)``.

    ``DEVICE``: see ``kernel_device``; ``tri``: the Triton backend module where kernels run here
    (else None); ``kernel_test``: decorator collecting a test only where the kernels run in this
    process; the last is the test that reruns ``test_file`` in an interpreter child otherwise."""
    device = kernel_device(child_flag)
    tri = importlib.import_module(triton_module) if device else None

    def kernel_test(fn):
        fn.__test__ = device is not None
        return fn

    def test_kernels_in_interpreter_subprocess():
        print(run_in_interpreter(test_file, child_flag, timeout=timeout))  # the child's summary, shown with -s

    test_kernels_in_interpreter_subprocess.__test__ = device is None
    return device, tri, kernel_test, test_kernels_in_interpreter_subprocess
