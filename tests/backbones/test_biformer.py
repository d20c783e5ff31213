"""BiFormer: official configs, official checkpoint layout, and forwards checked against an
oracle written here from the official code (BiFormer repo ``models/biformer.py``,
``models/_common.py``, ``ops/bra_legacy.py``), not from our modules."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo  # noqa: F401
from attnzoo.convert import convert_state_dict
from attnzoo.layers.bra import BiLevelRoutingAttention
from attnzoo.ops import routing

# name: (embed_dims, depths), as the official register functions; all: head_dim 32, mlp_ratio 3,
# topks (1, 4, 16, -2), n_win 7, qk_dims = embed_dims, AttentionLePE with 8 heads in the last stage
OFFICIAL = {
    "biformer_tiny": ((64, 128, 256, 512), (2, 2, 8, 2)),
    "biformer_small": ((64, 128, 256, 512), (4, 4, 18, 4)),
    "biformer_base": ((96, 192, 384, 768), (4, 4, 18, 4)),
}
# counted on the official models (the paper rounds them: 13.1M / 25.5M / 56.8M, 2.2 / 4.5 / 9.8 G)
PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
OFFICIAL_GMACS = {"biformer_tiny": 2.23, "biformer_small": 4.49, "biformer_base": 9.80}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _official_shapes(dims, depths, topks=(1, 4, 16, -2), mlp_ratio=3, num_classes=1000):
    """Keys and shapes of the official model's state_dict, written from the official module tree."""
    s = {}

    def conv_bn(p, cin, cout, k=3):
        s.update({p[0] + ".weight": (cout, cin, k, k), p[0] + ".bias": (cout,)})
        for n in ("weight", "bias", "running_mean", "running_var"):
            s[f"{p[1]}.{n}"] = (cout,)
        s[p[1] + ".num_batches_tracked"] = ()

    conv_bn(("downsample_layers.0.0", "downsample_layers.0.1"), 3, dims[0] // 2)
    conv_bn(("downsample_layers.0.3", "downsample_layers.0.4"), dims[0] // 2, dims[0])
    for i in range(1, 4):
        conv_bn((f"downsample_layers.{i}.0", f"downsample_layers.{i}.1"), dims[i - 1], dims[i])
    for i, (c, depth) in enumerate(zip(dims, depths)):
        h = mlp_ratio * c
        for j in range(depth):
            p = f"stages.{i}.{j}."
            s.update({p + "pos_embed.weight": (c, 1, 3, 3), p + "pos_embed.bias": (c,),
                      p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,),
                      p + "norm2.bias": (c,), p + "mlp.0.weight": (h, c), p + "mlp.0.bias": (h,),
                      p + "mlp.3.weight": (c, h), p + "mlp.3.bias": (c,)})
            if topks[i] > 0:
                s.update({p + "attn.qkv.qkv.weight": (3 * c, c), p + "attn.qkv.qkv.bias": (3 * c,),
                          p + "attn.wo.weight": (c, c), p + "attn.wo.bias": (c,),
                          p + "attn.lepe.weight": (c, 1, 5, 5), p + "attn.lepe.bias": (c,)})
            else:
                s.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)})
                if topks[i] == -2:
                    s.update({p + "attn.lepe.weight": (c, 1, 5, 5), p + "attn.lepe.bias": (c,)})
    conv_bn(("__", "norm"), 0, dims[-1])
    del s["__.weight"], s["__.bias"]
    s.update({"head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return s


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_official_layout(name):
    shapes = _official_shapes(*OFFICIAL[name])
    assert sum(torch.Size(s).numel() for k, s in shapes.items() if "running" not in k
               and "num_batches" not in k) == PARAMS[name]
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model.load_state_dict(convert_state_dict({"model": official}, model, "biformer"), strict=True)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_config(name):
    dims, depths = OFFICIAL[name]
    model = _meta(name)
    assert [len(s) for s in model.stages] == list(depths)
    for i, stage in enumerate(model.stages[:3]):
        attn = stage[0].attn
        assert isinstance(attn, BiLevelRoutingAttention)
        assert (attn.num_heads, attn.n_win, attn.topk) == (dims[i] // 32, 7, (1, 4, 16)[i])
        assert attn.scale == dims[i] ** -0.5  # qk_dim ** -0.5 over all heads, as the official code
    assert model.stages[3][0].attn.num_heads == 8 and model.stages[3][0].attn.lepe is not None
    assert model.feature_info == [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}")
                                  for i, d in enumerate(dims)]


@pytest.mark.parametrize("name", sorted(OFFICIAL_GMACS))
def test_gmacs(name, monkeypatch):
    """FlopCounterMode total / 2 at 224 px on the reference backend (its einsums count q.k and
    attn.v over the topk regions); within 3% of the official models' count."""
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    model = _meta(name).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() / 2e9 == pytest.approx(OFFICIAL_GMACS[name], rel=0.03)


# ----------------------------------------------------------------------------------------
# oracle: the official forward, written from the official code with plain torch (float64)

def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)


def _official_bra(sd, p, x, heads, n_win, topk):
    """``ops/bra_legacy.py`` with kv_downsample 'identity', no param / soft routing; x NHWC, H, W % n_win == 0."""
    N, H, W, C = x.shape
    h, w = H // n_win, W // n_win
    xw = x.view(N, n_win, h, n_win, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, n_win * n_win, h, w, C)
    qkv = F.linear(xw, sd[p + "qkv.qkv.weight"], sd[p + "qkv.qkv.bias"])
    q, kv = qkv[..., :C], qkv[..., C:]
    q_pix, kv_pix = q.reshape(N, n_win ** 2, h * w, C), kv.reshape(N, n_win ** 2, h * w, 2 * C)
    q_win, k_win = q.mean([2, 3]), kv[..., :C].mean([2, 3])
    v_map = kv[..., C:].reshape(N, n_win, n_win, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    lepe = F.conv2d(v_map, sd[p + "lepe.weight"], sd[p + "lepe.bias"], padding=2, groups=C).permute(0, 2, 3, 1)
    r_idx = torch.topk((q_win * C ** -0.5) @ k_win.transpose(-2, -1), k=topk, dim=-1).indices
    p2 = n_win ** 2
    sel = torch.gather(kv_pix.view(N, 1, p2, h * w, 2 * C).expand(-1, p2, -1, -1, -1), 2,
                       r_idx.view(N, p2, topk, 1, 1).expand(-1, -1, -1, h * w, 2 * C))
    k_sel = sel[..., :C].reshape(N * p2, topk * h * w, heads, C // heads).permute(0, 2, 3, 1)
    v_sel = sel[..., C:].reshape(N * p2, topk * h * w, heads, C // heads).transpose(1, 2)
    qh = q_pix.reshape(N * p2, h * w, heads, C // heads).transpose(1, 2)
    out = torch.softmax((qh * C ** -0.5) @ k_sel, -1) @ v_sel  # [N p2, m, hw, c]
    out = out.transpose(1, 2).reshape(N, n_win, n_win, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, C)
    return F.linear(out + lepe, sd[p + "wo.weight"], sd[p + "wo.bias"])


def _official_attention(sd, p, x, heads, with_lepe):
    """``models/_common.py`` ``Attention`` / ``AttentionLePE`` (lepe on the input, scale head_dim ** -0.5)."""
    N, H, W, C = x.shape
    t = x.reshape(N, H * W, C)
    q, k, v = F.linear(t, sd[p + "qkv.weight"]).reshape(N, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    out = (torch.softmax((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5, -1) @ v).transpose(1, 2).reshape(N, H, W, C)
    if with_lepe:
        out = out + F.conv2d(x.permute(0, 3, 1, 2), sd[p + "lepe.weight"], sd[p + "lepe.bias"], padding=2,
                             groups=C).permute(0, 2, 3, 1)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


def _official_forward(sd, x, depths, head_dim, n_win, topks, dense_heads):
    x = _bn(sd, "downsample_layers.0.1", F.conv2d(x, sd["downsample_layers.0.0.weight"],
                                                    sd["downsample_layers.0.0.bias"], stride=2, padding=1))
    x = _bn(sd, "downsample_layers.0.4", F.conv2d(F.gelu(x), sd["downsample_layers.0.3.weight"],
                                                    sd["downsample_layers.0.3.bias"], stride=2, padding=1))
    for i, depth in enumerate(depths):
        if i:
            x = _bn(sd, f"downsample_layers.{i}.1", F.conv2d(x, sd[f"downsample_layers.{i}.0.weight"],
                                                               sd[f"downsample_layers.{i}.0.bias"], stride=2,
                                                               padding=1))
        C = x.shape[1]
        for j in range(depth):
            p = f"stages.{i}.{j}."
            x = x + F.conv2d(x, sd[p + "pos_embed.weight"], sd[p + "pos_embed.bias"], padding=1, groups=C)
            x = x.permute(0, 2, 3, 1)
            y = _ln(sd, p + "norm1", x)
            if topks[i] > 0:
                y = _official_bra(sd, p + "attn.", y, C // head_dim, n_win, topks[i])
            else:
                y = _official_attention(sd, p + "attn.", y, dense_heads, topks[i] == -2)
            x = x + y
            y = F.linear(F.gelu(F.linear(_ln(sd, p + "norm2", x), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])),
                         sd[p + "mlp.3.weight"], sd[p + "mlp.3.bias"])
            x = (x + y).permute(0, 3, 1, 2)
    x = _bn(sd, "norm", x)
    return F.linear(x.flatten(2).mean(-1), sd["head.weight"], sd["head.bias"])


def _official_sd(name, num_classes=10, **kwargs):
    """Our model's weights, moved off their init (BN stats, biases, LN) and renamed to the official layout."""
    model = timm.create_model(name, num_classes=num_classes, **kwargs).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.copy_(0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))
            else:
                v.add_(0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
    return {k.replace("head.fc.", "head."): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("topks", [(1, 4, 9, -2), (2, 3, -1, -2)], ids=["test_cfg", "plain_attention"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_convert_matches_official_forward(topks, backend, monkeypatch):
    """96x96 keeps every map (24, 12, 6, 3) a multiple of n_win=3, where the official code runs."""
    monkeypatch.setenv("ATTNZOO_BACKEND", backend)
    sd = _official_sd("test_biformer", topks=topks)
    assert "stages.0.0.attn.qkv.qkv.weight" in sd and "head.weight" in sd
    model = timm.create_model("test_biformer", num_classes=10, topks=topks).double().eval()
    model.load_state_dict(convert_state_dict({"model": sd}, model, "biformer"), strict=True)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        expect = _official_forward(sd, x, (1, 1, 2, 1), 16, 3, topks, 4)
        torch.testing.assert_close(model(x), expect, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------
# the layer at sizes the official code refuses; odd inputs; the timm contract beyond test_models.py

def test_layer_padding_is_masked():
    """A non-divisible map: the layer is the op on the unpadded map (padding masked) plus LePE on V."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, 2, n_win=3, topk=2).double()
    x = torch.randn(2, 10, 8, 16, dtype=torch.float64)
    out, idx = layer(x, return_index=True)
    q, k, v = F.linear(x, layer.qkv.qkv.weight, layer.qkv.qkv.bias).chunk(3, -1)
    attn = routing.bra(*(t.reshape(2, 10, 8, 2, 8) for t in (q, k, v)), 3, 2, backend="reference").reshape(2, 10, 8, 16)
    lepe = layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, layer.wo(attn + lepe))
    assert idx.shape == (2, 9, 2)


def test_192x256_and_n_win_argument():
    """The official model asserts on 192x256 at n_win=7 (48x64 map); ours pads. n_win is an argument."""
    model = timm.create_model("test_biformer", n_win=7, num_classes=3).eval()
    assert {b.attn.n_win for s in model.stages[:3] for b in s} == {7}
    with torch.no_grad():
        out = model(torch.randn(1, 3, 192, 256))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_features_odd_size():
    model = timm.create_model("test_biformer").eval()
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        feats = timm.create_model("test_biformer", features_only=True).eval()
        feats.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no norm, no head
        out = feats(x)
    assert [tuple(t.shape[2:]) for t in inter] == [(17, 25), (9, 13), (5, 7), (3, 4)]
    torch.testing.assert_close(early, inter[:2])
    torch.testing.assert_close(normed[0], final)
    torch.testing.assert_close(out, inter)


def test_prune_intermediate_layers_and_group_matcher():
    from timm.models import group_parameters
    model = timm.create_model("test_biformer").eval()
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([1]) == [1]
        assert len(model.stages) == 2
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True), [full[1]])
