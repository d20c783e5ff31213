"""MAViT (MALA): official configs and parameter counts, the official checkpoint layout, GMACs,
the per-stage attention choice, and forwards checked against an oracle written here from the
official code (qhfan/MALA ``classfication_release/model.py``) on an official-layout state_dict
with perturbed weights, not from our modules."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.backbones import mala
from attnzoo.convert import convert_state_dict
from attnzoo.layers.mala import MagnitudeAwareLinearAttention, RopeSoftmaxAttention, RotaryEmbedding2d
from tools.benchmark import gmacs

# name: (embed_dims, depths, heads, projection, layer_init_values), as the official register functions
OFFICIAL = {
    "mala_tiny": ((64, 128, 256, 512), (2, 2, 6, 2), (1, 2, 4, 8), 2048, (1, 1, 1, 1)),
    "mala_small": ((64, 128, 320, 512), (3, 5, 9, 3), (1, 2, 5, 8), 2048, (1, 1, 1, 1)),
    "mala_base": ((96, 192, 384, 512), (4, 6, 12, 6), (1, 2, 6, 8), 2048, (1, 1, 1e-6, 1e-6)),
    "mala_large": ((96, 192, 448, 640), (4, 7, 19, 8), (1, 2, 7, 10), 2560, (1e-6,) * 4),
}
PARAMS = {"mala_tiny": 16_449_128, "mala_small": 27_142_568, "mala_base": 49_792_648, "mala_large": 97_766_088}
# FlopCounterMode / 2 of the official model at 224 px (fvcore-style MACs, attention matmuls included)
OFFICIAL_GMACS = {"mala_tiny": 2.65, "mala_small": 4.93, "mala_base": 10.64, "mala_large": 17.30}
MLP_RATIO = 3.5


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _official_shapes(embed_dims, depths, heads, projection, ls=True, mlp_ratio=MLP_RATIO, num_classes=1000):
    """Keys and shapes of the official model's state_dict, written from the official module tree."""
    s = {}
    e0, half = embed_dims[0], embed_dims[0] // 2
    for idx, (cin, cout) in zip((0, 3, 6, 9), ((3, half), (half, half), (half, half), (half, e0))):
        s.update({f"patch_embed.proj.{idx}.weight": (cout, cin, 3, 3), f"patch_embed.proj.{idx}.bias": (cout,)})
        bn = f"patch_embed.proj.{idx + 1}."
        s.update({bn + "weight": (cout,), bn + "bias": (cout,), bn + "running_mean": (cout,),
                  bn + "running_var": (cout,), bn + "num_batches_tracked": ()})
    for i, (c, depth, h) in enumerate(zip(embed_dims, depths, heads)):
        s[f"layers.{i}.RoPE.angle"] = (c // h // 2,)
        hid = int(mlp_ratio * c)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "pos.weight": (c, 1, 3, 3), p + "pos.bias": (c,),
                      p + "norm1.norm.weight": (c,), p + "norm1.norm.bias": (c,),
                      p + "attn.qkvo.weight": (4 * c, c, 1, 1), p + "attn.qkvo.bias": (4 * c,),
                      p + "attn.lepe.weight": (c, 1, 5, 5), p + "attn.lepe.bias": (c,),
                      p + "attn.proj.weight": (c, c, 1, 1), p + "attn.proj.bias": (c,),
                      p + "norm2.norm.weight": (c,), p + "norm2.norm.bias": (c,),
                      p + "ffn.fc1.weight": (hid, c, 1, 1), p + "ffn.fc1.bias": (hid,),
                      p + "ffn.fc2.weight": (c, hid, 1, 1), p + "ffn.fc2.bias": (c,),
                      p + "ffn.dwconv.weight": (hid, 1, 3, 3), p + "ffn.dwconv.bias": (hid,)})
            if ls:
                s.update({p + "gamma_1": (1, c, 1, 1), p + "gamma_2": (1, c, 1, 1)})
        if i < len(depths) - 1:
            o = embed_dims[i + 1]
            p = f"layers.{i}.downsample."
            s.update({p + "reduction.weight": (o, c, 3, 3), p + "reduction.bias": (o,), p + "norm.weight": (o,),
                      p + "norm.bias": (o,), p + "norm.running_mean": (o,), p + "norm.running_var": (o,),
                      p + "norm.num_batches_tracked": ()})
    s.update({"proj.weight": (projection, embed_dims[-1], 1, 1), "proj.bias": (projection,),
              "norm.weight": (projection,), "norm.bias": (projection,), "norm.running_mean": (projection,),
              "norm.running_var": (projection,), "norm.num_batches_tracked": (),
              "head.weight": (num_classes, projection, 1, 1), "head.bias": (num_classes,)})
    return s


def _n_params(shapes):
    return sum(torch.Size(s).numel() for k, s in shapes.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked", "angle")))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_official_layout(name):
    e, depths, heads, projection, _ = OFFICIAL[name]
    shapes = _official_shapes(e, depths, heads, projection)
    assert _n_params(shapes) == PARAMS[name]
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model.load_state_dict(convert_state_dict(official, model, "mala"), strict=True)


DROP_PATH = {"mala_tiny": 0.1, "mala_small": 0.15, "mala_base": 0.4, "mala_large": 0.55}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_config(name):
    """The released models are hybrids (official ``flagss``): MALA in stages 1-2, softmax in 3-4."""
    e, depths, heads, projection, init = OFFICIAL[name]
    model = _meta(name)
    kinds = [{type(b.attn) for b in stage.blocks} for stage in model.layers]
    assert kinds == [{MagnitudeAwareLinearAttention}] * 2 + [{RopeSoftmaxAttention}] * 2
    assert [s.blocks[0].attn.num_heads for s in model.layers] == list(heads)
    assert [len(s.blocks) for s in model.layers] == list(depths)
    assert model.feature_info == [dict(num_chs=c, reduction=4 * 2 ** i, module=f"layers.{i}")
                                  for i, c in enumerate(e)]
    assert model.num_features == projection
    dpr = [b.drop_path.drop_prob for s in model.layers for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert dpr[-1] == pytest.approx(DROP_PATH[name])
    small = timm.create_model(name, depths=(1, 1, 1, 1), num_classes=0)  # initial layer scales, real tensors
    for stage, value in zip(small.layers, init):
        assert (stage.blocks[0].gamma_1 == value).all() and (stage.blocks[0].gamma_2 == value).all()


@pytest.mark.parametrize("name", sorted(OFFICIAL_GMACS))
def test_gmacs(name, monkeypatch):
    """As ``tools/benchmark.gmacs`` (reference backend, explicit softmax attention), on meta tensors."""
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    model = _meta(name).eval()
    for m in model.modules():
        if isinstance(m, RopeSoftmaxAttention):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() / 2e9 == pytest.approx(OFFICIAL_GMACS[name], rel=0.03)


def test_benchmark_gmacs_counts_softmax_attention():
    """``tools/benchmark.gmacs`` turns SDPA (uncounted on CPU) into explicit math while counting,
    then back."""
    model = timm.create_model("test_mala", attn_layers=(RopeSoftmaxAttention,) * 4)
    fused = [m.fused_attn for m in model.modules() if isinstance(m, RopeSoftmaxAttention)]
    counted = gmacs(model, 64)
    assert [m.fused_attn for m in model.modules() if isinstance(m, RopeSoftmaxAttention)] == fused
    # q.k and attn.v: 2 * N^2 * C per block; stages at 16^2, 8^2, 4^2, 2^2 tokens
    attn = sum(2 * n ** 4 * c * d for n, c, d in zip((16, 8, 4, 2), (16, 32, 32, 64), (1, 1, 2, 1))) / 1e9
    for m in model.modules():
        if isinstance(m, RopeSoftmaxAttention):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    assert counted == pytest.approx(counter.get_total_flops() / 2e9) and counted > attn


def test_attention_per_stage_is_a_model_argument():
    all_linear = timm.create_model("test_mala", attn_layers=(MagnitudeAwareLinearAttention,) * 4)
    assert all(isinstance(b.attn, MagnitudeAwareLinearAttention) for s in all_linear.layers for b in s.blocks)
    soft = timm.create_model("test_mala", attn_layers=(RopeSoftmaxAttention,) * 4).eval()
    soft.load_state_dict(all_linear.state_dict())  # same parameters, other maths
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(soft(x), all_linear.eval()(x))
    with pytest.raises(ValueError, match="one entry per stage"):
        timm.create_model("test_mala", attn_layers=(RopeSoftmaxAttention,) * 3)


def test_rope_tables_are_the_official_ones():
    """Official ``RoPE.forward`` ([N, head_dim] sin / cos, h-part then w-part, each angle twice):
    ours is its every other column, for any map size."""
    rope = RotaryEmbedding2d(64, 2)
    assert rope.angle.shape == (16,)
    theta = 1.0 / (10000 ** torch.linspace(0, 1, 8))
    torch.testing.assert_close(rope.angle, theta.repeat_interleave(2))
    for h, w in ((5, 7), (14, 14)):
        ih, iw = torch.arange(h).float(), torch.arange(w).float()
        full = torch.cat([(ih[:, None] * rope.angle).unsqueeze(1).repeat(1, w, 1),
                          (iw[:, None] * rope.angle).unsqueeze(0).repeat(h, 1, 1)], -1).flatten(0, 1)
        cos, sin = rope(h, w)
        torch.testing.assert_close(cos, full.cos()[:, 0::2])
        torch.testing.assert_close(sin, full.sin()[:, 0::2])
        torch.testing.assert_close(full[:, 0::2], full[:, 1::2])  # pairs share their angle: a true rotation
    # the tables follow the model's dtype, at least float32; the buffer stays in the state_dict
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        assert {t.dtype for t in rope.to(dtype)(3, 4)} == {expected}, dtype
    assert list(rope.state_dict()) == ["angle"]


# ----------------------------------------------------------------------------------------
# oracle: the official forward, written from the official code with plain torch


def _rotate_every_two(x):
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def _official_rope(angle, h, w):
    ih = torch.arange(h).to(angle)
    iw = torch.arange(w).to(angle)
    ph = (ih[:, None] * angle[None, :]).unsqueeze(1).repeat(1, w, 1)
    pw = (iw[:, None] * angle[None, :]).unsqueeze(0).repeat(h, 1, 1)
    phase = torch.cat([ph, pw], -1).flatten(0, 1)
    return phase.sin(), phase.cos()


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + "weight"], sd[p + "bias"], **kw)


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def _ln2d(sd, p, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[p + "weight"], sd[p + "bias"], 1e-6).permute(0, 3, 1, 2)


def _official_attention(sd, p, x, heads, sin, cos, linear):
    B, C, H, W = x.shape
    qkvo = _conv(sd, p + "qkvo.", x)
    qkv, o = qkvo[:, :3 * C], qkvo[:, 3 * C:]
    lepe = F.conv2d(qkv[:, 2 * C:], sd[p + "lepe.weight"], sd[p + "lepe.bias"], padding=2, groups=C)
    q, k, v = qkv.reshape(B, 3, heads, C // heads, H * W).permute(1, 0, 2, 4, 3)  # 'b (m n d) h w -> m b n (h w) d'
    scale = (C // heads) ** -0.5
    if linear:
        q, k = F.elu(q) + 1, F.elu(k) + 1
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) * scale
        q, k = q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin
        kv = (k.transpose(-2, -1) * (scale / (H * W)) ** 0.5) @ (v * (scale / (H * W)) ** 0.5)
        res = q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=2, keepdim=True)
    else:
        q, k = q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin
        res = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v
    res = res.transpose(-1, -2).reshape(B, C, H, W)
    return _conv(sd, p + "proj.", (res + lepe) * o)


def _official_forward(sd, x, depths, heads, flags):
    """``MALA.forward`` on an official state_dict and each stage's blocks' output; ``flags[i]``:
    stage i is linear ('l') or softmax ('v')."""
    feats = []
    for idx in (0, 3, 6, 9):
        x = _bn(sd, f"patch_embed.proj.{idx + 1}.", _conv(sd, f"patch_embed.proj.{idx}.", x,
                                                          stride=2 if idx in (0, 9) else 1, padding=1))
        x = F.gelu(x) if idx < 9 else x
    for i, depth in enumerate(depths):
        sin, cos = _official_rope(sd[f"layers.{i}.RoPE.angle"], *x.shape[2:])
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            C = x.shape[1]
            x = x + F.conv2d(x, sd[p + "pos.weight"], sd[p + "pos.bias"], padding=1, groups=C)
            y = _official_attention(sd, p + "attn.", _ln2d(sd, p + "norm1.norm.", x), heads[i], sin, cos,
                                    flags[i] == "l")
            x = x + sd.get(p + "gamma_1", 1.0) * y
            h = F.gelu(_conv(sd, p + "ffn.fc1.", _ln2d(sd, p + "norm2.norm.", x)))
            h = h + F.conv2d(h, sd[p + "ffn.dwconv.weight"], sd[p + "ffn.dwconv.bias"], padding=1,
                             groups=h.shape[1])
            x = x + sd.get(p + "gamma_2", 1.0) * _conv(sd, p + "ffn.fc2.", h)
        feats.append(x)
        if i < len(depths) - 1:
            x = _bn(sd, f"layers.{i}.downsample.norm.", _conv(sd, f"layers.{i}.downsample.reduction.", x,
                                                               stride=2, padding=1))
    x = _bn(sd, "norm.", _conv(sd, "proj.", x))
    x = (x * torch.sigmoid(x)).mean((2, 3), keepdim=True)
    return _conv(sd, "head.", x).flatten(1), feats


def _random_official(shapes, seed):
    """An official-layout state_dict with every tensor perturbed: BN statistics, and layer scales
    around 1 (tiny initial scales would hide attention errors)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(s, dtype=torch.long)
        elif k.endswith("angle"):
            sd[k] = (1.0 / (10000 ** torch.linspace(0, 1, s[0] // 2))).repeat_interleave(2)
        elif k.endswith("running_var") or "gamma" in k:
            sd[k] = torch.rand(s, generator=g) + 0.5
        elif k.endswith(("bias", "running_mean")):
            sd[k] = torch.randn(s, generator=g) * 0.02
        else:
            fan_in = torch.Size(s[1:]).numel() or 1
            sd[k] = torch.randn(s, generator=g) * 1.5 / fan_in ** 0.5
    return sd


TEST_CFG = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), projection=48)


# float64 as tight as the other families: the RoPE tables follow the model's dtype
ORACLE_TOL = {torch.float32: 1e-5, torch.float64: 1e-13}


@pytest.mark.parametrize("flags,size,dtype", [
    ("llvv", (64, 64), torch.float32), ("llvv", (67, 45), torch.float32), ("llll", (64, 96), torch.float32),
    ("vlvl", (40, 72), torch.float32), ("llvv", (67, 45), torch.float64), ("llll", (40, 72), torch.float64)],
    ids=str)
def test_forward_matches_official_oracle(flags, size, dtype):
    kinds = {"l": MagnitudeAwareLinearAttention, "v": RopeSoftmaxAttention}
    e, depths, heads, proj = TEST_CFG["embed_dims"], TEST_CFG["depths"], TEST_CFG["num_heads"], TEST_CFG["projection"]
    shapes = _official_shapes(e, depths, heads, proj, num_classes=10)
    sd = _random_official(shapes, seed=len(flags) + size[0])
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model = timm.create_model("test_mala", num_classes=10, mlp_ratio=MLP_RATIO, layer_scales=(1.0,) * 4,
                              attn_layers=tuple(kinds[f] for f in flags), **TEST_CFG).to(dtype).eval()
    model.load_state_dict(convert_state_dict(sd, model, "mala"), strict=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    tol = ORACLE_TOL[dtype]
    with torch.no_grad():
        expected, feats = _official_forward(sd, x, depths, heads, flags)
        for backend in ("reference", "cpu"):
            for blk in (b for s in model.layers for b in s.blocks):
                if isinstance(blk.attn, MagnitudeAwareLinearAttention):
                    blk.attn.backend = backend
            got = model(x)
            got_feats = model.forward_intermediates(x, intermediates_only=True)
            assert (got - expected).abs().max() <= tol * expected.abs().max(), backend
            # the stage maps carry the image (pooled logits of a random net barely do)
            for i, (a, b) in enumerate(zip(got_feats, feats)):
                assert a.dtype == dtype and a.shape == b.shape, (backend, i)
                assert (a - b).abs().max() <= tol * b.abs().max(), (backend, i)
                assert (b[0] - b[1]).abs().max() > 0.1 * b.abs().max()


def test_converter_round_trip():
    """Official layout -> ours (``head`` conv -> ``head.fc`` linear) and back to the same tensors."""
    e, depths, heads, proj = TEST_CFG["embed_dims"], TEST_CFG["depths"], TEST_CFG["num_heads"], TEST_CFG["projection"]
    shapes = _official_shapes(e, depths, heads, proj, num_classes=10)
    sd = _random_official(shapes, seed=3)
    ours = mala.checkpoint_filter_fn({"model": sd})
    assert ours["head.fc.weight"].shape == (10, proj) and "head.weight" not in ours
    back = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in ours.items()}
    back["head.weight"] = back["head.weight"].view(10, proj, 1, 1)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_layer_rejects_bad_input():
    layer = MagnitudeAwareLinearAttention(32, 2)
    with pytest.raises(ValueError, match=r"expected \[B, 32, H, W\]"):
        layer(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="multiple of 4"):
        RotaryEmbedding2d(24, 4)
