"""Official checkpoints -> attnzoo, checked against an independent functional
forward written from the official code's semantics (not from our modules)."""
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import attnzoo  # noqa: F401
from attnzoo.backbones._helpers import load_checkpoint_file
from attnzoo.convert import convert_checkpoint, convert_state_dict
from tools import convert_checkpoint as convert_tool

# ours -> official, the inverse of the families' rules, written out by hand
TO_OFFICIAL = {
    "cbam": [(".se.channel.fc1.", ".cbam.ChannelGate.mlp.1."), (".se.channel.fc2.", ".cbam.ChannelGate.mlp.3."),
             (".se.spatial.", ".cbam.SpatialGate.spatial.")],
    "eca": [(".se.conv.", ".eca.conv."), ("head.fc.", "classifier.1.")],
}


def _perturbed(model):
    """Random init hides bugs (CBAM's spatial BN starts at zero): move every tensor."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
            else:
                v.add_(0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
    return model


def _official_sd(name, family):
    model = _perturbed(timm.create_model(name, num_classes=10).double())
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in TO_OFFICIAL[family]:
            k = k.replace(a, b)
        sd["module." + k] = v.clone()
    return {"state_dict": sd, "epoch": 90, "best_prec1": 77.0}


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, 1e-5)


def _cbam(sd, p, x):
    mlp = lambda t: F.linear(F.relu(F.linear(t, sd[p + "ChannelGate.mlp.1.weight"], sd[p + "ChannelGate.mlp.1.bias"])),
                             sd[p + "ChannelGate.mlp.3.weight"], sd[p + "ChannelGate.mlp.3.bias"])
    x = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)  # official order: [max, mean]
    s = _bn(sd, p + "SpatialGate.spatial.bn.", F.conv2d(pooled, sd[p + "SpatialGate.spatial.conv.weight"], padding=3))
    return x * torch.sigmoid(s)


def _eca(sd, p, x):
    w = sd[p + "conv.weight"]
    y = F.conv1d(x.mean((2, 3)).unsqueeze(1), w, padding=w.shape[-1] // 2).squeeze(1)
    return x * torch.sigmoid(y)[:, :, None, None]


def _official_resnet_forward(ckpt, x, layers, bottleneck):
    sd = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    x = F.max_pool2d(F.relu(_bn(sd, "bn1.", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for li, n in enumerate(layers):
        for bi in range(n):
            p = f"layer{li + 1}.{bi}."
            stride = 2 if bi == 0 and li > 0 else 1
            if bottleneck:
                out = F.relu(_bn(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"])))
                out = F.relu(_bn(sd, p + "bn2.", F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1)))
                out = _bn(sd, p + "bn3.", F.conv2d(out, sd[p + "conv3.weight"]))
            else:
                out = F.relu(_bn(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1)))
                out = _bn(sd, p + "bn2.", F.conv2d(out, sd[p + "conv2.weight"], padding=1))
            out = _cbam(sd, p + "cbam.", out) if p + "cbam.ChannelGate.mlp.1.weight" in sd else _eca(sd, p + "eca.", out)
            short = _bn(sd, p + "downsample.1.", F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride)) \
                if p + "downsample.0.weight" in sd else x
            x = F.relu(out + short)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("name,family,layers,bottleneck", [
    ("cbam_resnet18", "cbam", (2, 2, 2, 2), False),
    ("cbam_resnet50", "cbam", (3, 4, 6, 3), True),
    ("eca_resnet18", "eca", (2, 2, 2, 2), False),
    ("eca_resnet50", "eca", (3, 4, 6, 3), True),
])
def test_convert_matches_official_semantics(tmp_path, name, family, layers, bottleneck):
    ckpt = _official_sd(name, family)
    src, dst = tmp_path / "official.pth.tar", tmp_path / "ours.safetensors"
    torch.save(ckpt, src)
    assert convert_tool.main(["--model", name, "--input", str(src), "--output", str(dst)]) == 0
    model = timm.create_model(name, num_classes=10).double().eval()
    model.load_state_dict(load_file(str(dst)))
    x = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    with torch.no_grad():
        expected = _official_resnet_forward(ckpt, x, layers, bottleneck)
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_eca_kernel_sizes_follow_released_checkpoints():
    """eca_resnet50_k3557 etc.: the paper formula would give other sizes (ECANet issue #46)."""
    expected = {"eca_resnet18": (3, 5, 7, 7), "eca_resnet34": (3, 3, 5, 7), "eca_resnet50": (3, 5, 5, 7),
                "eca_resnet101": (3, 3, 5, 7), "eca_resnet152": (3, 3, 5, 7)}
    for name, ks in expected.items():
        model = timm.create_model(name)
        got = tuple(getattr(model, f"layer{i + 1}")[0].se.conv.weight.shape[-1] for i in range(4))
        assert got == ks, name
    mb = timm.create_model("eca_mobilenet_v2")
    assert [b.conv[-1].conv.weight.shape[-1] for b in mb.features[1:-1]] == [1] * 10 + [3] * 7


def test_mobilenet_official_keys(tmp_path):
    ckpt = _official_sd("eca_mobilenet_v2", "eca")
    assert "module.classifier.1.weight" in ckpt["state_dict"]
    assert "module.features.2.conv.4.conv.weight" in ckpt["state_dict"]
    path = tmp_path / "mb.pth"
    torch.save(ckpt, path)
    model, _ = convert_checkpoint(str(path), "eca_mobilenet_v2")
    assert model.num_classes == 10


@pytest.mark.parametrize("wrapper", ["raw", "model", "state_dict"])
def test_checkpoint_wrappers(wrapper):
    sd = {k[len("module."):]: v for k, v in _official_sd("test_cbam_resnet", "cbam")["state_dict"].items()}
    ckpt = sd if wrapper == "raw" else {wrapper: {"module." + k: v for k, v in sd.items()}}
    model = timm.create_model("test_cbam_resnet", num_classes=10).double()
    model.load_state_dict(convert_state_dict(ckpt, model, "cbam"))


def test_wrong_keys_are_listed():
    ckpt = _official_sd("test_cbam_resnet", "cbam")
    sd = ckpt["state_dict"]
    sd["module.extra.weight"] = torch.zeros(1)
    del sd["module.fc.bias"]
    model = timm.create_model("test_cbam_resnet", num_classes=10)
    with pytest.raises(ValueError, match=r"missing keys \[fc\.bias\]; unexpected keys \[extra\.weight\]"):
        convert_state_dict(ckpt, model, "cbam")
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_state_dict(_official_sd("test_cbam_resnet", "cbam"), timm.create_model("test_cbam_resnet"), "cbam")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_checkpoint_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "hook": _Evil()}, f)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_checkpoint_file(str(path))


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="not an attnzoo model"):
        convert_checkpoint("nowhere.pth", "resnet50")
