"""The dispatch table shared by every op (``attnzoo/ops/_dispatch.py``)."""
import pytest
import torch

from attnzoo.ops import _dispatch


class _Impl:
    pass


@pytest.mark.parametrize("cpu,triton,names", [
    (None, None, ["reference"]),
    (_Impl(), None, ["cpu", "reference"]),
    (None, "no.such.triton.module", ["triton", "reference"]),
    (_Impl(), "no.such.triton.module", ["triton", "cpu", "reference"]),
])
def test_standard_backends_with_fewer_backends(cpu, triton, names):
    backends = _dispatch.standard_backends(_Impl(), cpu, triton)
    assert [b.name for b in backends] == names
    x = torch.zeros(1)
    assert _dispatch.choose_backend("op", backends, [x]).name == ("cpu" if cpu is not None else "reference")
    with pytest.raises(ValueError, match="unknown backend 'cpu'" if cpu is None else "unknown backend 'x'"):
        _dispatch.choose_backend("op", backends, [x], backend="cpu" if cpu is None else "x")


def test_no_autocast_turns_autocast_off_and_reports_its_dtype():
    assert _dispatch.autocast_dtype("cpu") is None
    with torch.autocast("cpu", torch.bfloat16):
        assert _dispatch.autocast_dtype("cpu") == torch.bfloat16
        with _dispatch.no_autocast("cpu"):
            assert _dispatch.autocast_dtype("cpu") is None
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with _dispatch.no_autocast("meta"):  # no autocast on meta: a no-op, not an error
        pass
