"""``pretrained=True``: official-layout checkpoints served over loopback HTTP, downloaded into a temporary
``TORCH_HOME`` by timm and converted on load; every weight must equal the served one. No test here can reach
anything but 127.0.0.1 (``socket.connect`` refuses other hosts)."""
import argparse
import importlib.util
import io
import json
import os
import pickle
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import pytest
import timm
import torch
from timm.models import get_arch_pretrained_cfgs, set_pretrained_download_progress

import attnzoo
from attnzoo.backbones._pretrained import cache_file_name

CFG_KEYS = ("url", "num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
            "first_conv", "classifier", "license", "paper_ids", "origin_url")
TOOLS = Path(__file__).resolve().parents[2] / "tools"


# ----------------------------------------------------------------------------- loopback server, no internet

class _Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; stops at teardown, or by itself after 5 minutes."""

    def __init__(self):
        self.files, self.requests = {}, []
        files, requests = self.files, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                body = files.get(urlsplit(self.path).path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.timer = threading.Timer(300, self.httpd.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def serve(self, path_and_query: str, checkpoint) -> str:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        self.files[urlsplit(path_and_query).path] = buf.getvalue()
        return f"http://127.0.0.1:{self.httpd.server_port}{path_and_query}"

    def close(self):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """A fresh TORCH_HOME; any connection but to loopback fails."""
    real = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"a test tried to reach {address}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


# ----------------------------------------------------------------------------- official layouts, ours -> theirs

def _perturbed(name):
    model = timm.create_model(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g))
    return model


def _rename(sd, rules, prefix=""):
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            k = k.replace(a, b)
        out[prefix + k] = v.clone()
    return out


def _swin_style(sd, monkeypatch):
    """``utils.save_checkpoint`` of Agent-Attention: model, optimizer, scheduler, epoch and the yacs config,
    pickled as ``yacs.config.CfgNode`` (a stand-in module while the checkpoint is written; yacs is not needed)."""
    node_cls = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    module = types.ModuleType("yacs.config")
    module.CfgNode = node_cls
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    config = node_cls(MODEL=node_cls(NAME="agent_swin_tiny", DROP_PATH_RATE=0.2), DATA=node_cls(IMG_SIZE=224))
    config.__dict__.update(__immutable__=True, __deprecated_keys__=set(), __new_allowed__=False)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "lr_scheduler": {"t_in_epochs": False}, "max_accuracy": 82.6, "epoch": 299, "config": config}


def _ema(sd):
    return {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}


def _agent_swin(sd, mp):
    # official: patch merging ends stage i-1 (ours starts stage i); buffers that ours does not save
    out = {}
    for k, v in _rename(sd, [("head.fc.", "head.")]).items():
        p = k.split(".")
        if p[0] == "layers" and p[2] == "downsample":
            p[1] = str(int(p[1]) - 1)
        out[".".join(p)] = v
    out["layers.3.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    out["layers.3.blocks.1.attn_mask"] = torch.zeros(1, 4, 4)
    return _swin_style(out, mp)


def _agent_pvt(sd, mp):
    out = {}
    for k, v in _rename(sd, [("head.fc.", "head.")]).items():
        p = k.split(".")
        if p[0] == "stages":
            i = int(p[1]) + 1
            k = {"patch_embed": f"patch_embed{i}", "pos_embed": f"pos_embed{i}", "blocks": f"block{i}"}[p[2]]
            k = ".".join([k] + p[3:])
        out[k] = v
    return _swin_style(out, mp)


def _mala(sd, mp):
    out = _rename(sd, [("head.fc.", "head.")])
    out["head.weight"] = out["head.weight"][:, :, None, None]  # the official classifier is a 1x1 conv
    return {"model": out, "model_ema": _ema(out), "args": argparse.Namespace(model="MALA_T", input_size=224)}


OFFICIAL = {  # model: (ours -> official checkpoint, URL path of the kind the authors publish)
    "test_nat": (lambda sd, mp: _rename(sd, [("head.fc.", "head.")]), "/projects/nat/checkpoints/CLS/test_nat.pth"),
    "test_biformer": (lambda sd, mp: {"model": _rename(sd, [("head.fc.", "head.")]), "model_ema": _ema(sd),
                                      "args": argparse.Namespace(model="biformer_tiny", input_size=224),
                                      "scaler": {"scale": 65536.0}, "epoch": 299, "max_accuracy": 81.4},
                      "/v1.0/shares/s!TestBiFormerShare/root/content"),
    "test_agent_swin": (_agent_swin, "/f/0123456789abcdef0123/?dl=1"),
    "test_agent_pvt": (_agent_pvt, "/f/fedcba9876543210fedc/?dl=1"),
    "test_mala": (_mala, "/aldjalkdf/MAViT/resolve/main/test_mala.pth"),
    "test_cbam_resnet": (lambda sd, mp: {
        "state_dict": _rename(sd, [(".se.channel.fc1.", ".cbam.ChannelGate.mlp.1."),
                                   (".se.channel.fc2.", ".cbam.ChannelGate.mlp.3."),
                                   (".se.spatial.", ".cbam.SpatialGate.spatial.")], prefix="module."),
        "arch": "resnet", "epoch": 100, "best_prec1": torch.tensor(77.622)}, "/RESNET50_CBAM_new_name_wrap.pth"),
    "test_eca_resnet": (lambda sd, mp: {"state_dict": _rename(sd, [(".se.conv.", ".eca.conv.")], prefix="module."),
                                        "arch": "eca_resnet50", "epoch": 99}, "/eca_resnet50_k3557.pth.tar"),
    "test_attn_halonet": (lambda sd, mp: _rename(sd, []), "/v0.1-attn-weights/test_attn_halonet.pth"),
}


def _official(name, server, monkeypatch):
    """``(source model, URL serving its official-layout checkpoint)``."""
    src = _perturbed(name)
    writer, path = OFFICIAL[name]
    with monkeypatch.context() as mp:
        url = server.serve(path, writer(src.state_dict(), mp))
    return src, url


def _assert_same(model, src):
    ours, theirs = model.state_dict(), src.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert v.dtype == ours[k].dtype and torch.equal(ours[k], v), k


# ----------------------------------------------------------------------------- download + convert, bit-exact

@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_pretrained_downloads_and_converts_exactly(name, server, offline, monkeypatch):
    src, url = _official(name, server, monkeypatch)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url))
    _assert_same(model, src)
    assert model.pretrained_cfg["url"] == url
    basename = os.path.basename(urlparse(url).path)
    cached = basename if "." in basename else cache_file_name(url, name, model.pretrained_cfg["tag"])
    assert (offline / cached).is_file(), sorted(os.listdir(offline))
    n = len(server.requests)
    _assert_same(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url)), src)
    assert len(server.requests) == n, "a cached checkpoint was downloaded again"


def test_progress_bar(server, monkeypatch, capfd):
    src, url = _official("test_agent_pvt", server, monkeypatch)
    set_pretrained_download_progress(True)
    try:
        timm.create_model("test_agent_pvt", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    finally:
        set_pretrained_download_progress(False)
    assert "100%" in capfd.readouterr().err


def test_fine_tune_gets_a_new_classifier(server, monkeypatch):
    src, url = _official("test_nat", server, monkeypatch)
    model = timm.create_model("test_nat", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(url=url))
    assert model.get_classifier().weight.shape[0] == 3
    ours = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(ours[k], v), k


def test_features_only(server, monkeypatch):
    src, url = _official("test_biformer", server, monkeypatch)
    feat = timm.create_model("test_biformer", pretrained=True, features_only=True,
                             pretrained_cfg_overlay=dict(url=url)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(feat(x), src.eval().forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_file_loads_as_it_is(name, tmp_path, monkeypatch):
    """A file downloaded from a share page needs no convert step: ``file=`` converts it on load too."""
    src = _perturbed(name)
    with monkeypatch.context() as mp:
        torch.save(OFFICIAL[name][0](src.state_dict(), mp), tmp_path / "official.pth")
    _assert_same(timm.create_model(name, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth"))), src)


# ----------------------------------------------------------------------------- failures name the file

def test_checkpoint_that_does_not_fit_is_named(server, monkeypatch):
    _, url = _official("test_cbam_resnet", server, monkeypatch)
    with pytest.raises(RuntimeError, match=rf"{url} does not fit test_eca_resnet: missing keys \[layer1\.0\.se"):
        timm.create_model("test_eca_resnet", pretrained=True, pretrained_cfg_overlay=dict(url=url))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_pickled_code_is_refused(server, capfd):
    server.files["/evil.pth"] = pickle.dumps({"model": {"w": torch.zeros(1)}, "hook": _Evil()}, protocol=2)
    url = f"http://127.0.0.1:{server.httpd.server_port}/evil.pth"
    with pytest.raises(RuntimeError, match=f"{url}: not a weights-only checkpoint"):
        timm.create_model("test_nat", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    assert "unpickled arbitrary code" not in capfd.readouterr().out


@pytest.mark.parametrize("path", ["/missing.pth", "/f/0000000000/?dl=1"])
def test_http_error_names_the_url(server, path):
    url = f"http://127.0.0.1:{server.httpd.server_port}{path}"
    with pytest.raises(RuntimeError, match=r"could not download .*404"):
        timm.create_model("test_nat", pretrained=True, pretrained_cfg_overlay=dict(url=url))


def test_share_page_only_explains_the_convert_step(server):
    n = len(server.requests)
    with pytest.raises(RuntimeError, match=r"cbam_resnet50\.in1k: no weights to download.*drive\.google\.com"):
        timm.create_model("cbam_resnet50", pretrained=True)
    assert len(server.requests) == n


# ----------------------------------------------------------------------------- the registered tags

def _tags():
    return [(name, c.tag, c) for name in attnzoo.list_models() for c in get_arch_pretrained_cfgs(name).values()]


def test_every_tag_has_a_complete_cfg():
    cache_names = {}
    for name, tag, c in _tags():
        d = c.to_dict()
        missing = [k for k in CFG_KEYS if k not in d and k != "url"]
        assert not missing, (name, tag, missing)
        default = timm.models.get_pretrained_cfg(name)
        assert (c.first_conv, c.classifier) == (default.first_conv, default.classifier), (name, tag)
        if tag == "untrained":
            assert not c.url, (name, tag)
            continue
        assert c.url or c.notes, f"{name}.{tag}: neither a URL nor notes on where the weights are"
        if c.url:
            assert c.url.startswith("https://"), (name, tag)
            cached = cache_file_name(c.url, name, tag) or os.path.basename(urlparse(c.url).path)
            assert cached not in cache_names, f"{name}.{tag} and {cache_names.get(cached)} share the cache file"
            cache_names[cached] = f"{name}.{tag}"


def test_direct_downloads_per_family():
    families = {}
    for name, tag, c in _tags():
        families.setdefault(timm.models.get_pretrained_cfg(name).origin_url, set()).add(bool(c.url))
    with_url = {o for o, has in families.items() if True in has}
    assert with_url == {"https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
                        "https://github.com/LeapLabTHU/Agent-Attention", "https://github.com/rayleizhu/BiFormer",
                        "https://github.com/huggingface/pytorch-image-models"}


def test_high_resolution_tag_builds_at_its_size():
    assert timm.create_model("agent_pvt_medium.in1k_256").stages[0].feat_size == (64, 64)
    assert timm.create_model("agent_pvt_medium.in1k_256", img_size=224).stages[0].feat_size == (56, 56)


# ----------------------------------------------------------------------------- converted -> timm model folder

def _tool(name):
    spec = importlib.util.spec_from_file_location(f"attnzoo_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_to_local_dir(tmp_path, monkeypatch):
    src = _perturbed("test_agent_swin")
    with monkeypatch.context() as mp:
        torch.save(_agent_swin(src.state_dict(), mp), tmp_path / "official.pth")  # holds a yacs config
    folder = tmp_path / "agent_swin_local"
    assert _tool("convert_checkpoint").main(["--model", "test_agent_swin", "--input", str(tmp_path / "official.pth"),
                                             "--local-dir", str(folder)]) == 0
    config = json.load(open(folder / "config.json"))
    assert config["architecture"] == "test_agent_swin"
    assert config["pretrained_cfg"]["crop_mode"] == "squash" and "url" not in config["pretrained_cfg"]
    _assert_same(timm.create_model(f"local-dir:{folder}", pretrained=True), src)
    _assert_same(timm.create_model("test_agent_swin", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"))), src)


# ----------------------------------------------------------------------------- tools/validate.py, tools/train.py

@pytest.fixture
def registered_url(server, monkeypatch):
    """Registers a served official checkpoint as test_nat's weights, as a released tag's url."""
    import dataclasses
    from timm.models._registry import _model_pretrained_cfgs

    src, url = _official("test_nat", server, monkeypatch)
    for key in ("test_nat", "test_nat.untrained"):  # timm registers the default tag under both names
        monkeypatch.setitem(_model_pretrained_cfgs, key, dataclasses.replace(_model_pretrained_cfgs[key], url=url))
    n = torch.get_num_threads()
    yield src
    torch.set_num_threads(n)  # the tools pick a thread count for the process


def _created(module, monkeypatch):
    """The state of every model ``module`` creates, as created."""
    states, create = [], module.C.create_model

    def record(*args, **kwargs):
        model = create(*args, **kwargs)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(module.C, "create_model", record)
    return states


def test_validate_pretrained(registered_url, tmp_path, monkeypatch):
    validate = _tool("validate")
    states = _created(validate, monkeypatch)
    row = validate.main(["--model", "test_nat", "--pretrained", "--batch-size", "128", "--no-progress",
                         "--results-file", str(tmp_path / "r.csv")])
    assert row["num_classes"] == 1000 and row["images"] > 0
    for k, v in registered_url.state_dict().items():
        assert torch.equal(states[0][k], v), k


def test_train_fine_tunes_pretrained(registered_url, tmp_path, monkeypatch):
    train = _tool("train")
    states = _created(train, monkeypatch)
    train.main(["--model", "test_nat", "--pretrained", "--epochs", "1", "--limit", "32", "--batch-size", "32",
                "--output", str(tmp_path / "out"), "--no-progress"])
    assert states[0]["head.fc.weight"].shape[0] == 10  # the digits' classes: a new classifier
    for k, v in registered_url.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(states[0][k], v), k
