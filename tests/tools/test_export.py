"""ONNX export and torch.compile of every family's tiny model, and the dispatch rule behind them:
during a graph capture every op runs a backend the capture can trace (the reference on CPU).

The model lists come from ``attnzoo.list_models("test_*")``, so a merged family joins here
without an edit. ``torch.compile`` with inductor costs ~1-2 min per model on a busy CPU:
those tests are marked ``slow`` (``pytest -m slow tests/tools/test_export.py``); the default
suite compiles the ops with dynamo's ``eager`` backend, which traces the same graph.
"""
import logging

import pytest
import torch

import attnzoo
import timm
from attnzoo.ops import _dispatch
from tools import export_onnx

TINY = attnzoo.list_models("test_*")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("name", TINY)
def test_tiny_model_exports_with_parity(name, tmp_path):
    s = export_onnx.main(["--model", name, "--img-size", "64", "--out", str(tmp_path / f"{name}.onnx")])
    checks = {r["check"]: r for r in s["checks"]}
    assert s["ok"] and s["max_rel_err"] <= 1e-4
    # the batch axis is dynamic in every export: checked at a batch other than the export's
    assert checks["dynamic batch"]["ok"] and checks["dynamic batch"]["input"].startswith("3x")
    if s["dynamic_hw"]:
        assert [r["input"] for r in s["checks"] if r["check"] == "dynamic H/W"] == ["1x3x96x80", "1x3x77x71"]
    import onnx
    model = onnx.load(s["path"])
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch


def test_export_fixes_hw_when_the_graph_bakes_the_size_in(tmp_path, monkeypatch):
    """A model whose graph holds its export size fails the second-size check and is re-exported static."""

    class Baked(torch.nn.Module):
        def forward(self, x):
            # a Python int from the shape becomes a constant in the traced graph
            return x.mean((2, 3)) * float(x.shape[-1])

    monkeypatch.setattr(export_onnx.C, "create_model", lambda *a, **k: Baked())
    monkeypatch.setattr(export_onnx.C, "check_model_name", lambda name: None)
    s = export_onnx.main(["--model", "baked", "--img-size", "64", "--out", str(tmp_path / "b.onnx")])
    assert s["ok"] and not s["dynamic_hw"] and "failed at 96×80" in s["note"] and "fixed H/W 64×64" in s["note"]
    assert [r["check"] for r in s["checks"]] == ["export input", "dynamic batch"]


def test_export_fixes_hw_when_the_dynamic_export_fails(tmp_path, monkeypatch):
    """The TorchScript exporter cannot size adaptive pooling of a map with dynamic H/W
    (Agent attention pools its queries): the tool falls back to a fixed size."""

    class Pooled(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    monkeypatch.setattr(export_onnx.C, "create_model", lambda *a, **k: Pooled())
    monkeypatch.setattr(export_onnx.C, "check_model_name", lambda name: None)
    s = export_onnx.main(["--model", "pooled", "--img-size", "64", "--out", str(tmp_path / "p.onnx")])
    assert s["ok"] and not s["dynamic_hw"] and "dynamic H/W export failed" in s["note"]


def test_export_falls_back_to_the_dynamo_exporter(tmp_path, monkeypatch):
    """Ceil division written ``-(-H // n)`` (BiFormer's region grid) traces into ONNX's truncating
    Div, wrong even at the export size: the tool re-exports with torch.export's exporter."""

    class CeilDiv(torch.nn.Module):
        def forward(self, x):
            n = -(-x.shape[2] // 3)
            return x[:, :, :n].mean((2, 3)) * n

    monkeypatch.setattr(export_onnx.C, "create_model", lambda *a, **k: CeilDiv())
    monkeypatch.setattr(export_onnx.C, "check_model_name", lambda name: None)
    s = export_onnx.main(["--model", "ceil", "--img-size", "64", "--out", str(tmp_path / "c.onnx")])
    assert s["ok"] and s["exporter"] == "dynamo" and s["opset"] >= 18
    assert s["note"].startswith("TorchScript exporter: at 2x3x64x64")


def test_perturb_switches_every_branch_on():
    model = timm.create_model(TINY[0])
    export_onnx.perturb(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() > 1:
            assert t.min() != t.max(), name


def test_export_reports_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "compare", lambda *a: (1.0, 1.0))
    with pytest.raises(SystemExit):
        export_onnx.main(["--model", TINY[0], "--img-size", "64", "--out", str(tmp_path / "m.onnx"),
                          "--static-size"])


# --------------------------------------------------------------------------- dispatch during capture

class _Probe(torch.nn.Module):
    """Records the capture seen and the backend chosen for a CPU tensor, during its forward."""

    def __init__(self, forced=None):
        super().__init__()
        self.seen, self.forced = [], forced

    def forward(self, x):
        from attnzoo.ops import gate
        b = _dispatch.choose_backend("probe", gate.BACKENDS, [x], self.forced)
        self.seen.append((_dispatch.capturing(), b.name))
        return x * 2


def test_eager_uses_the_fast_backend():
    p = _Probe()
    p(torch.randn(1, 2, 3, 3))
    assert p.seen == [(None, "cpu")]


@pytest.mark.parametrize("forced", [None, "cpu"])
def test_onnx_export_routes_to_reference(tmp_path, forced, caplog, monkeypatch):
    monkeypatch.setattr(_dispatch, "_LOGGED", set())  # logged once per process otherwise
    p = _Probe(forced)
    with caplog.at_level(logging.INFO, logger=_dispatch.__name__):
        torch.onnx.export(p, (torch.randn(1, 2, 3, 3),), str(tmp_path / "p.onnx"), dynamo=False)
    assert ("onnx", "reference") in p.seen
    # the substitution is said, as a warning when the backend was forced
    assert "using the reference backend" in caplog.text
    assert ("cannot be traced" in caplog.text) == (forced is not None)


def test_compile_routes_to_reference():
    p = _Probe("cpu")
    out = torch.compile(p, fullgraph=True, backend="eager")(torch.randn(1, 2, 3, 3))
    assert out.shape == (1, 2, 3, 3)
    assert ("compile", "reference") in p.seen


def test_triton_backend_traceable_by_compile_only_when_registered(monkeypatch):
    triton = next(b for b in _dispatch.standard_backends(None, None, "some.triton.module") if b.name == "triton")
    assert not any(triton.can_trace(c) for c in _dispatch.CAPTURES)
    monkeypatch.setattr(_dispatch, "_COMPILE_TRACEABLE", {"some.triton.module"})
    assert triton.can_trace("compile") and not triton.can_trace("onnx") and not triton.can_trace("export")
    # a backend built without a rule: traceable only if it is the reference
    assert _dispatch.Backend("reference", None, _dispatch.can_run_reference).can_trace("onnx")
    assert not _dispatch.Backend("cpu", None, _dispatch.can_run_cpu).can_trace("compile")


def test_ops_compile_fullgraph_eager_backend():
    """Every op's public function traces without a graph break (dynamo's eager backend: no codegen)."""
    from attnzoo.ops.gate import cbam_gate, eca_gate
    from attnzoo.ops.neighborhood import na1d, na2d

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.ReLU(), torch.nn.Linear(2, 8))
    conv = torch.nn.Conv2d(2, 1, 7, padding=3)
    x = torch.randn(2, 8, 9, 7)
    w = torch.randn(1, 1, 3)
    q, k, v = (torch.randn(1, 9, 10, 2, 4) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    rel = torch.randn(1, 9, 10, 2, 6)
    fns = [
        lambda: cbam_gate(x, mlp, conv),
        lambda: eca_gate(x, w),
        lambda: na2d(q, k, v, 3, dilation=2, rpb=rpb),
        lambda: na2d(q, k, v, 6, stride=2, border="zero_pad", rel_h=rel, rel_w=rel),
        lambda: na1d(q[:, :, 0], k[:, :, 0], v[:, :, 0], 3),
    ]
    for fn in fns:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(), fn())


# --------------------------------------------------------------------------- torch.compile (slow)

@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_compiles_fullgraph(name):
    torch._dynamo.reset()
    model = export_onnx.perturb(timm.create_model(name).eval())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_exports_with_dynamo_exporter(name, tmp_path):
    s = export_onnx.main(["--model", name, "--img-size", "64", "--dynamo", "--opset", "18",
                          "--out", str(tmp_path / f"{name}.onnx")])
    assert s["ok"] and s["exporter"] == "dynamo"


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_trains_compiled(name, monkeypatch):
    """A training step through torch.compile(fullgraph=True) (aot_eager: dynamo and AOTAutograd,
    no codegen) gives eager's output and gradients. Eager runs the reference backend too, which
    is what the capture traces: fast path against reference is the op tests' job (MALA's 1/z
    amplifies their fp32 rounding past this test's tolerance)."""
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    torch._dynamo.reset()
    model = export_onnx.perturb(timm.create_model(name)).train()
    x = torch.randn(2, 3, 64, 48)
    runs = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same drop-path draws in both runs
        out = fn(x)
        out.square().mean().backward()
        runs.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    # gradients against the largest one: a parameter whose true gradient is zero (a bias a
    # normalisation cancels) holds only rounding noise, which no relative tolerance matches
    gscale = max(g.abs().max().item() for g in runs[0][1:])
    for i, (got, want) in enumerate(zip(*reversed(runs))):
        scale = want.abs().max().item() if i == 0 else gscale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
