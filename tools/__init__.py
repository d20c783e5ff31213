"""Command-line tools, a package: run from the repo root as ``python tools/<name>.py`` (see _bootstrap.py) or
``python -m tools.<name>``; shared helpers in _common.py (mm tools: _mm.py; train.py: _train_utils.py)."""
