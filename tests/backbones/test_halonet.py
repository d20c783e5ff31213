"""HaloNets: attnzoo's HaloAttention (on na2d border='zero_pad') against timm's HaloAttn / HaloNets."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn

import attnzoo.backbones.halonet as halonet  # registers the models
from attnzoo import convert
from attnzoo.layers.halo import HaloAttention

BACKENDS = ["reference", None]  # None: the default (best that can run)

LAYER_CASES = [
    dict(dim=32, num_heads=4, block_size=8, halo_size=2),
    dict(dim=32, num_heads=4, block_size=8, halo_size=3, stride=2),  # strided query blocks
    dict(dim=24, dim_out=32, num_heads=2, block_size=4, halo_size=1, qk_ratio=0.5),  # dqk != dv
    dict(dim=16, num_heads=2, block_size=4, halo_size=2, dim_head=12, qkv_bias=True),
    dict(dim=16, num_heads=2, block_size=6, halo_size=2, stride=2, avg_down=True),
    dict(dim=16, num_heads=2, block_size=7, halo_size=2, stride=2, scale_pos_embed=True),  # odd block: avg pool
    dict(dim=16, num_heads=2, block_size=4, halo_size=0),
]


def _pair(kw, seed=0):
    torch.manual_seed(seed)
    ref = HaloAttn(**kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = HaloAttention(**kw).double()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names
    return ref, ours


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, HaloAttention):
            m.backend = backend
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", LAYER_CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_layer_matches_timm(kw, backend):
    ref, ours = _pair(kw)
    ours.backend = backend
    m = kw["block_size"] * kw.get("stride", 1)
    x = torch.randn(2, kw["dim"], 2 * m, 3 * m, dtype=torch.double, requires_grad=True)
    a, b = ref(x), ours(x)
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x] + list(ref.parameters()), g)
    gb = torch.autograd.grad(b, [x] + list(ours.parameters()), g)
    for u, w in zip(gb, ga):
        torch.testing.assert_close(u, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [c for c in LAYER_CASES if not c.get("qkv_bias") and not c.get("avg_down")
                                and c["block_size"] % c.get("stride", 1) == 0],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("size", [(13, 7), (3, 2), (17, 33)])
def test_layer_any_size_is_timm_on_zero_padded_input(kw, backend, size):
    """Off-multiple maps: timm on the input zero-padded (bottom / right) to the block, cropped back."""
    ref, ours = _pair(kw)
    ours.backend = backend
    H, W = size
    s = kw.get("stride", 1)
    x = torch.randn(2, kw["dim"], H, W, dtype=torch.double)
    m = kw["block_size"] * s
    xp = F.pad(x, [0, -W % m, 0, -H % m])
    expect = ref(xp)[..., :-(-H // s), :-(-W // s)]
    torch.testing.assert_close(ours(x), expect, rtol=1e-10, atol=1e-10)


def test_layer_rejects_bad_args():
    with pytest.raises(ValueError, match="stride"):
        HaloAttention(16, num_heads=2, stride=3)
    with pytest.raises(ValueError, match="num_heads"):
        HaloAttention(16, num_heads=3)
    with pytest.raises(RuntimeError, match="input"):
        HaloAttention(16, num_heads=2)(torch.randn(16, 8, 8))


def _perturbed_timm(name, seed=0):
    """Random timm model with nothing trivial: random BN affines (the zero-init last BNs of the blocks small),
    BN statistics calibrated on random inputs (so activations stay input-dependent), random head."""
    torch.manual_seed(seed)
    model = timm.create_model(name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and not n.startswith("head"):
                if n.endswith("weight") and not p.any():  # zero-init last BN of a block: small residual
                    p.normal_(0.0, 0.1)
                else:
                    p.normal_(1.0 if n.endswith("weight") else 0.0, 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model.train()(torch.randn(2, 3, 256, 256))
        model.head.fc.weight.normal_(0, 0.05)
        model.head.fc.bias.normal_(0, 0.1)
    return model.eval()


def _convert(sd, model):
    if "halonet" not in convert.CONVERTERS:  # until attnzoo.backbones imports the family
        convert.CONVERTERS["halonet"] = halonet.checkpoint_filter_fn
    return convert.convert_state_dict(sd, model, family="halonet")


@pytest.mark.parametrize("ours_name,timm_name,size,backend", [
    ("attn_halonet26t", "halonet26t", 256, "reference"),
    ("attn_halonet26t", "halonet26t", 256, None),
    ("attn_halonet50ts", "halonet50ts", 256, "reference"),
    ("attn_halonet50ts", "halonet50ts", 256, None),
    ("haloattn_h1", "halonet_h1", 256, None),  # halo in every block: slow, default backend only
])
def test_model_matches_timm(ours_name, timm_name, size, backend):
    ref = _perturbed_timm(timm_name)
    ours = _set_backend(timm.create_model(ours_name).eval(), backend)
    sd = _convert({"state_dict": ref.state_dict()}, ours)  # wrapped, as a training checkpoint
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = ref(x), ours(x)
        fa, fb = ref.forward_features(x), ours.forward_features(x)
    assert (a[0] - a[1]).abs().max() > 0.1 * a.abs().max()  # the input matters
    assert ((b - a).norm() / a.norm()).item() <= 1e-5
    assert ((fb - fa).norm() / fa.norm()).item() <= 1e-5


@pytest.mark.parametrize("name,timm_name", [("attn_halonet26t", "halonet26t"), ("attn_halonet50ts", "halonet50ts"),
                                            ("haloattn_h1", "halonet_h1")])
def test_param_count_is_timms(name, timm_name):
    ours = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == sum(p.numel() for p in timm.create_model(timm_name).parameters())
    assert ours == {"attn_halonet26t": 12_480_288, "attn_halonet50ts": 22_733_280, "haloattn_h1": 8_100_056}[name]


H_PARAMS = {"haloattn_h0": 5_500_952, "haloattn_h1": 8_100_056, "haloattn_h2": 9_404_312,
            "haloattn_h3": 11_841_304, "haloattn_h4": 19_101_976, "haloattn_h5": 30_717_272,
            "haloattn_h6": 43_456_792, "haloattn_h7": 67_433_240}


def test_h_series_param_counts():
    """H0..H7 as laid out here (H1 = timm's halonet_h1); the paper's table has 5.5, 8.1, 9.4,
    11.8, 19.1, 30.7 and 67.4M for H0-H5 and H7."""
    counts = {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in H_PARAMS}
    assert counts == H_PARAMS


def test_value_wide_block_widens_values_only():
    """H5's rv = 2.5: q / k keep the bottleneck width, values and the attention output are 2.5x."""
    model = timm.create_model("haloattn_h5")
    block = model.stages[2][0]
    attn = block.self_attn
    mid = block.conv1_1x1.conv.out_channels
    assert mid == 256 and attn.q.out_channels == mid
    assert attn.kv.out_channels == mid + int(mid * 2.5)
    assert block.conv3_1x1.conv.in_channels == int(mid * 2.5) == block.post_attn.num_features
    with torch.no_grad():
        out = block(torch.randn(1, block.conv1_1x1.conv.in_channels, 28, 28))
    assert out.shape == (1, 512, 14, 14)


def test_timm_names_untouched():
    from timm.models import model_entrypoint
    for name in ("halonet26t", "halonet50ts", "halonet_h1"):
        assert model_entrypoint(name).__module__.startswith("timm."), name
    for name in ("attn_halonet26t", "attn_halonet50ts", "test_attn_halonet", "haloattn_h0", "haloattn_h4"):
        assert model_entrypoint(name).__module__ == "attnzoo.backbones.halonet", name


@pytest.mark.parametrize("size", [(64, 48), (33, 47), (100, 72)])
def test_any_input_size(size):
    model = timm.create_model("attn_halonet26t", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3)
    feat = timm.create_model("test_attn_halonet", features_only=True).eval()
    with torch.no_grad():
        outs = feat(torch.randn(1, 3, *size))
    assert [o.shape[-2:] for o in outs] == [(-(-size[0] // r), -(-size[1] // r)) for r in feat.feature_info.reduction()]


def test_tiny_backward_and_checkpointing():
    model = timm.create_model("test_attn_halonet", num_classes=4).train()
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 40, 56)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
