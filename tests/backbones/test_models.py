"""timm-style contract tests over every registered attnzoo model."""
import pytest
import timm
import torch
from timm.layers import get_channel_dim
from timm.models import model_entrypoint

import attnzoo

MODELS = attnzoo.list_models()
# small inputs keep the suite fast; every model must take any size >= 32 px
INPUT = (2, 3, 64, 48)
CFG_KEYS = ("url", "num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
            "first_conv", "classifier", "license", "paper_ids", "origin_url")


def _create(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs)


def test_registry_is_ours_and_shadows_nothing():
    assert MODELS and MODELS == sorted(MODELS)
    for name in MODELS:
        assert model_entrypoint(name).__module__.startswith("attnzoo."), name
    assert attnzoo.list_models("cbam_*") == [n for n in MODELS if n.startswith("cbam_")]
    # timm's own models keep their timm definitions
    for name in ("halonet50ts", "resnet50", "ecaresnet50d"):
        assert model_entrypoint(name).__module__.startswith("timm."), name


def test_register_refuses_timm_names():
    from attnzoo._registry import register_model

    def resnet50(pretrained=False, **kwargs):  # noqa: F811  (a timm name on purpose)
        raise AssertionError("never built")

    with pytest.raises(RuntimeError, match="shadow"):
        register_model(resnet50)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = _create(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(INPUT))
    assert out.shape == (INPUT[0], 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_model_odd_size(name):
    """The official CBAM model fails off 224 px (fixed AvgPool2d(7)); ours takes any size >= 32."""
    model = _create(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 5)


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    model = _create(name, num_classes=10).train()
    out = model(torch.randn(INPUT))
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_model_features(name):
    model = _create(name).eval()
    info = model.feature_info
    x = torch.randn(INPUT)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert len(inter) == len(info)
    for f, t in zip(info, inter):
        assert t.shape[1] == f["num_chs"], (f, t.shape)
        assert t.shape[2] == -(-INPUT[2] // f["reduction"]), (f, t.shape)
    assert [t.shape for t in only] == [inter[1].shape, inter[2].shape]
    assert [t.shape for t in early] == [inter[1].shape]
    torch.testing.assert_close(final, model.forward_features(x))
    # timm reads forward_features' layout from output_fmt (NCHW when absent), as on its Swin
    fmt = getattr(model, "output_fmt", "NCHW")
    assert final.dim() == 4 and final.shape[get_channel_dim(fmt)] == model.num_features, (fmt, final.shape)

    feat = _create(name, features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        feats = feat(x)
    assert [t.shape[1] for t in feats] == feat.feature_info.channels() == [info[i]["num_chs"] for i in (1, 2, 3)]
    assert feat.feature_info.reduction() == [info[i]["reduction"] for i in (1, 2, 3)]


@pytest.mark.parametrize("name", MODELS)
def test_model_classifier_and_cfg(name):
    model = _create(name, num_classes=7).eval()
    cfg = model.pretrained_cfg
    missing = [k for k in CFG_KEYS if k not in cfg]
    assert not missing, f"pretrained_cfg lacks {missing}"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    model.reset_classifier(0)
    with torch.no_grad():
        out = model(torch.randn(INPUT))
    assert out.shape == (INPUT[0], model.num_features)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(torch.randn(INPUT)).shape == (INPUT[0], 3)
    assert model.group_matcher()


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("test_")] + ["eca_mobilenet_v2"])
def test_grad_checkpointing(name):
    model = _create(name, num_classes=4).train()
    model.set_grad_checkpointing(True)
    model(torch.randn(INPUT)).sum().backward()


@pytest.mark.parametrize("name", ["test_cbam_resnet", "eca_mobilenet_v2"])
def test_model_bad_input(name):
    model = _create(name).eval()
    with pytest.raises(RuntimeError, match="channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(RuntimeError, match="input"):
        model(torch.randn(10))


def test_nan_input_propagates():
    model = _create("test_cbam_resnet", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 10, 10] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model(x)).any(), "a NaN input must not be silently swallowed by the gates"


# Official parameter counts (the ECA paper's 24.37M does not match its own code).
PARAMS = {
    "cbam_resnet18": 11_779_392, "cbam_resnet34": 21_960_468, "cbam_resnet50": 28_089_624,
    "cbam_resnet101": 49_330_172, "eca_resnet18": 11_689_556, "eca_resnet34": 21_797_744,
    "eca_resnet50": 25_557_112, "eca_resnet101": 44_549_317, "eca_resnet152": 60_193_042,
    "eca_mobilenet_v2": 3_504_903,
    "biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968,
    "agent_swin_tiny": 28_902_964, "agent_swin_small": 49_666_684, "agent_swin_base": 88_095_096,
    "agent_pvt_tiny": 11_570_352, "agent_pvt_small": 20_635_066, "agent_pvt_medium": 35_921_746,
    "agent_pvt_large": 48_738_180,
    "mala_tiny": 16_449_128, "mala_small": 27_142_568, "mala_base": 49_792_648, "mala_large": 97_766_088,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    model = _create(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
