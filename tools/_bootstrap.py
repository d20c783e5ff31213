"""Makes the ``tools`` package importable when a tool runs by path (``python tools/x.py``, ``torchrun tools/x.py``).

Python then puts tools/ itself first on sys.path: ``from tools import _common`` is not found there, and every
tool module would be importable under a second, bare name. This puts the repo root in its place, the path
``python -m tools.x`` runs with, so both ways import the same modules (and a source checkout's attnzoo,
without ``pip install``). Every tool runs it, before its first ``tools`` or ``attnzoo`` import, with:

    if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
        import _bootstrap  # noqa: F401

(``python -m tools.x`` and imports set ``__package__``; loads by file path, as importlib's
``spec_from_file_location``, keep a non-``__main__`` name: both leave sys.path alone.)
"""
import sys
from pathlib import Path

_TOOLS = Path(__file__).resolve().parent
sys.path[:] = [str(_TOOLS.parent)] + [p for p in sys.path if not p or Path(p).resolve() != _TOOLS]
