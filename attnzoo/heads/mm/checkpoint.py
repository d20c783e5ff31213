"""mmengine checkpoints under torch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.

mmengine 0.10.7 saves the message hub (``HistoryBuffer`` objects holding numpy arrays) in every
checkpoint and reads local files with a bare ``torch.load``, so ``resume=True`` fails to unpickle them.
:func:`install` replaces only mmengine's local-file checkpoint loader with one that allows exactly
those types (and a ``getattr`` limited to ``HistoryBuffer``'s own methods), still under
``weights_only=True``: nothing else in the process changes, and arbitrary pickled code is still refused.
"""
import codecs
import os.path as osp
import pickle

import numpy as np
import torch


def _history_buffer_getattr(obj, name):
    """Stands in for ``getattr`` while unpickling: a ``HistoryBuffer`` pickles its statistics methods
    (``min``, ``mean``...) as ``getattr(HistoryBuffer, name)``. Nothing else may be looked up."""
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in vars(HistoryBuffer) and callable(vars(HistoryBuffer)[name]):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer methods are allowed")


def _allowed_globals():
    from mmengine.logging import HistoryBuffer
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    scalars = [np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_]
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes, *scalars,
            codecs.encode, (_history_buffer_getattr, "builtins.getattr")]


def load_from_local(filename, map_location):
    """mmengine's ``load_from_local`` with the message hub's types allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
