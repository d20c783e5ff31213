"""NAT / DiNAT: official configs, official checkpoint layout, and forwards checked against
oracles written here from the official code (NAT repo ``classification/nat.py`` +
``dinat.py``, NATTEN 0.14 ``natten2d.py`` and ``natten_cpu_commons.h``), not from our modules."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import DropPath
from torch.utils.flop_counter import FlopCounterMode

import attnzoo  # noqa: F401
from attnzoo.backbones import nat
from attnzoo.convert import convert_state_dict
from attnzoo.layers.neighborhood import NeighborhoodAttention2d
from tools import convert_checkpoint as convert_tool

# name: (embed_dim, depths, heads, mlp_ratio, layer_scale, dilations), as the official register functions
_D224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
OFFICIAL = {
    "nat_mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3, False, None),
    "nat_tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3, False, None),
    "nat_small": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2, True, None),
    "nat_base": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2, True, None),
    "dinat_mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3, False, [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]),
    "dinat_tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3, False, _D224),
    "dinat_small": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2, False, _D224),  # no layer scale, unlike nat_small
    "dinat_base": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2, True, _D224),
    "dinat_large": (192, (3, 4, 18, 5), (6, 12, 24, 48), 2, False, _D224),
}
# official code's parameter counts (NAT / DiNAT READMEs round them: 20M, 28M, 51M, 90M, 200M)
PARAMS = {
    "nat_mini": 19_984_174, "nat_tiny": 27_901_582, "nat_small": 50_743_297, "nat_base": 89_769_652,
    "dinat_mini": 19_984_174, "dinat_tiny": 27_901_582, "dinat_small": 50_719_681, "dinat_base": 89_769_652,
    "dinat_large": 200_943_514,
}
# the papers' GFLOPs (fvcore MACs with NATTEN's flop handles) at 224 px
PAPER_GMACS = {"nat_mini": 2.71, "nat_tiny": 4.32, "nat_small": 7.81, "nat_base": 13.72, "dinat_mini": 2.71,
               "dinat_tiny": 4.32, "dinat_small": 7.81, "dinat_base": 13.72, "dinat_large": 30.6}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _official_shapes(name, num_classes=1000):
    """Keys and shapes of the official model's state_dict, written from the official module tree."""
    e, depths, heads, mlp_ratio, layer_scale, _ = OFFICIAL[name]
    s = {"patch_embed.proj.0.weight": (e // 2, 3, 3, 3), "patch_embed.proj.0.bias": (e // 2,),
         "patch_embed.proj.1.weight": (e, e // 2, 3, 3), "patch_embed.proj.1.bias": (e,),
         "patch_embed.norm.weight": (e,), "patch_embed.norm.bias": (e,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = e * 2 ** i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            s.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                      p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,), p + "attn.rpb": (h, 13, 13),
                      p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                      p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                      p + "mlp.fc1.weight": (mlp_ratio * c, c), p + "mlp.fc1.bias": (mlp_ratio * c,),
                      p + "mlp.fc2.weight": (c, mlp_ratio * c), p + "mlp.fc2.bias": (c,)})
            if layer_scale:
                s.update({p + "gamma1": (c,), p + "gamma2": (c,)})
        if i < len(depths) - 1:  # ConvDownsampler at the end of the level; conv without bias
            s.update({f"levels.{i}.downsample.reduction.weight": (2 * c, c, 3, 3),
                      f"levels.{i}.downsample.norm.weight": (2 * c,), f"levels.{i}.downsample.norm.bias": (2 * c,)})
    c = e * 2 ** (len(depths) - 1)
    s.update({"norm.weight": (c,), "norm.bias": (c,), "head.weight": (num_classes, c), "head.bias": (num_classes,)})
    return s


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_official_layout(name):
    shapes = _official_shapes(name)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == PARAMS[name]
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    # an official-layout state_dict converts and loads strictly
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model.load_state_dict(convert_state_dict(official, model, "nat"), strict=True)


def test_dinat_small_differs_from_nat_small_by_layer_scale():
    # the official dinat_small passes no layer_scale; nat_small passes 1e-5 -> 2 * dim per block
    extra = sum(2 * 96 * 2 ** i * d for i, d in enumerate((3, 4, 18, 5)))
    assert PARAMS["nat_small"] - PARAMS["dinat_small"] == extra == 23_616
    assert _meta("nat_small").levels[0].blocks[0].gamma1.shape == (96,)
    assert not hasattr(_meta("dinat_small").levels[0].blocks[0], "gamma1")


DROP_PATH = {"mini": 0.2, "tiny": 0.2, "small": 0.3, "base": 0.5, "large": 0.35}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_config(name):
    e, depths, heads, mlp_ratio, layer_scale, dilations = OFFICIAL[name]
    model = _meta(name)
    dilations = dilations or [[1] * d for d in depths]
    assert [[b.attn.dilation for b in lvl.blocks] for lvl in model.levels] == \
        [[(d, d) for d in ds] for ds in dilations]
    assert [lvl.blocks[0].attn.num_heads for lvl in model.levels] == list(heads)
    assert {b.attn.kernel_size for lvl in model.levels for b in lvl.blocks} == {(7, 7)}
    assert model.feature_info == [dict(num_chs=e * 2 ** i, reduction=4 * 2 ** i, module=f"levels.{i}")
                                  for i in range(4)]
    dpr = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0
           for lvl in model.levels for b in lvl.blocks]
    assert dpr[0] == 0 and dpr[-1] == pytest.approx(DROP_PATH[name.split("_")[1]])
    assert all(b.layer_scale == layer_scale for lvl in model.levels for b in lvl.blocks)
    if layer_scale:  # initial value, on a one-block-per-level build (real tensors)
        small = timm.create_model(name, depths=(1, 1, 1, 1), dilations=[[1]] * 4, num_classes=0)
        gammas = torch.cat([g for n, g in small.named_parameters() if "gamma" in n])
        assert gammas.numel() == 2 * sum(e * 2 ** i for i in range(4)) and (gammas == 1e-5).all()


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_gmacs(name, monkeypatch):
    """FlopCounterMode total / 2 at 224 px on the reference backend, whose einsums count the
    attention matmuls (q.k and attn.v, k*k per query); within 3% of the papers' numbers."""
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    model = _meta(name).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    # the attention matmuls are counted, exactly once: q.k and attn.v, 49 MACs per channel per token
    e, depths, *_ = OFFICIAL[name]
    attention = sum(2 * (56 >> i) ** 2 * e * 2 ** i * 49 * d for i, d in enumerate(depths))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == 2 * attention
    gmacs = counter.get_total_flops() / 2e9
    assert gmacs == pytest.approx(PAPER_GMACS[name], rel=0.03)


# ----------------------------------------------------------------------------------------
# oracles: the official forward, written from the official code with plain torch


def _window_start(i, length, kernel, dilation):
    """NATTEN 0.14 ``get_window_start`` (natten_cpu_commons.h), transcribed."""
    n = kernel // 2
    if dilation <= 1:
        return max(i - n, 0) + (i + n >= length) * (length - i - n - 1)
    if i - n * dilation < 0:
        return i % dilation
    if i + n * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        return length - b + imodd - 2 * n * dilation if imodd < b else a + imodd - kernel * dilation
    return i - n * dilation


def _pb_start(i, length, kernel, dilation):
    """NATTEN 0.14 ``get_pb_start``, transcribed."""
    n = kernel // 2
    if dilation <= 1:
        return n + (i < n) * (n - i) + (i + n >= length) * (length - i - 1 - n)
    if i - n * dilation < 0:
        return kernel - 1 - i // dilation
    if i + n * dilation >= length:
        return (length - i - 1) // dilation
    return n


def _official_na(sd, p, x, heads, kernel, dilation):
    """NATTEN 0.14 ``NeighborhoodAttention2D.forward`` as masked full attention: zero-pad
    bottom/right up to kernel*dilation before qkv, every query scores only its window
    (+ rpb), crop after."""
    B, H, W, C = x.shape
    window = kernel * dilation
    x = F.pad(x, (0, 0, 0, max(0, window - W), 0, max(0, window - H)))
    Hp, Wp = x.shape[1:3]
    D = C // heads
    qkv = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(B, Hp * Wp, 3, heads, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * D ** -0.5, qkv[1], qkv[2]
    bias = torch.full((heads, Hp * Wp, Hp * Wp), float("-inf"), dtype=x.dtype)
    steps = torch.arange(kernel) * dilation
    for i in range(Hp):
        for j in range(Wp):
            rows = _window_start(i, Hp, kernel, dilation) + steps
            cols = _window_start(j, Wp, kernel, dilation) + steps
            pi, pj = _pb_start(i, Hp, kernel, dilation), _pb_start(j, Wp, kernel, dilation)
            bias[:, i * Wp + j, (rows[:, None] * Wp + cols[None, :]).flatten()] = \
                sd[p + "rpb"][:, pi:pi + kernel, pj:pj + kernel].flatten(1)
    out = ((q @ k.transpose(-2, -1) + bias).softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, C)
    return F.linear(out[:, :H, :W], sd[p + "proj.weight"], sd[p + "proj.bias"])


def _ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)


def _official_forward(sd, x, heads, kernel, dilations):
    """The official ``NAT.forward`` (classification/nat.py) on an official state_dict."""
    x = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=2, padding=1)
    x = F.conv2d(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"], stride=2, padding=1)
    x = _ln(sd, "patch_embed.norm.", x.permute(0, 2, 3, 1))
    for i, level_dilations in enumerate(dilations):
        for j, d in enumerate(level_dilations):
            p = f"levels.{i}.blocks.{j}."
            y = _official_na(sd, p + "attn.", _ln(sd, p + "norm1.", x), heads[i], kernel, d)
            x = x + (sd[p + "gamma1"] * y if p + "gamma1" in sd else y)
            y = _ln(sd, p + "norm2.", x)
            y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            x = x + (sd[p + "gamma2"] * y if p + "gamma2" in sd else y)
        p = f"levels.{i}.downsample."
        if p + "reduction.weight" in sd:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "reduction.weight"], stride=2, padding=1)
            x = _ln(sd, p + "norm.", x.permute(0, 2, 3, 1))
    x = _ln(sd, "norm.", x).mean((1, 2))  # AdaptiveAvgPool1d over the tokens
    return F.linear(x, sd["head.weight"], sd["head.bias"])


# ours -> official: the inverse of checkpoint_filter_fn, written out by hand
TO_OFFICIAL = [("head.fc.", "head.")]
TINY = {  # heads, kernel, dilations of the tiny test variants
    "test_nat": ((1, 2, 2, 4), 3, [[1], [1], [1, 1], [1]]),
    "test_dinat": ((1, 2, 2, 4), 3, [[4], [2], [1, 2], [1]]),
}


def _perturbed(model):
    """Random init hides bugs (zero biases, rpb ~ 0.02, layer scale 1e-5): move every tensor."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith(("gamma1", "gamma2")):
                v.copy_(0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))
            else:
                v.add_((0.5 if k.endswith("rpb") else 0.05) * torch.randn(v.shape, generator=g, dtype=v.dtype))
    return model


def _official_sd(name, num_classes=10):
    model = _perturbed(timm.create_model(name, num_classes=num_classes).double())
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in TO_OFFICIAL:
            k = k.replace(a, b)
        sd[k] = v.clone()
    return sd


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [(64, 48), (37, 45)])  # 37x45: every level pads (10x12 map, dilation 4)
def test_convert_matches_official_forward(name, size):
    sd = _official_sd(name)
    assert "head.weight" in sd and "levels.0.blocks.0.attn.rpb" in sd
    model = timm.create_model(name, num_classes=10).double().eval()
    model.load_state_dict(convert_state_dict(sd, model, "nat"), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    heads, kernel, dilations = TINY[name]
    with torch.no_grad():
        torch.testing.assert_close(model(x), _official_forward(sd, x, heads, kernel, dilations),
                                   rtol=1e-9, atol=1e-9)


def test_convert_tool(tmp_path):
    sd = _official_sd("test_dinat", num_classes=7)
    src, dst = tmp_path / "dinat.pth", tmp_path / "dinat.safetensors"
    torch.save({"model": sd}, src)
    assert convert_tool.main(["--model", "test_dinat", "--input", str(src), "--output", str(dst)]) == 0
    model = timm.create_model("test_dinat", num_classes=7).double()
    model.load_state_dict(load_file(str(dst)), strict=True)
    torch.testing.assert_close(model.head.fc.weight, sd["head.weight"])


# ----------------------------------------------------------------------------------------
# one attention layer / one block against full attention (no window formulas involved)


def _full_attention(layer, x, dilation=(1, 1), key_valid=None):
    """Every query attends every key of its dilation sub-grid; rpb by (key - query) / dilation.
    Equals neighborhood attention when the map is exactly kernel * dilation on each axis."""
    B, H, W, C = x.shape
    heads, D = layer.num_heads, layer.head_dim
    (kh, kw), (dh, dw) = layer.kernel_size, dilation
    qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias).reshape(B, H * W, 3, heads, D).permute(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(-2, -1) * D ** -0.5
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    i, j = i.flatten(), j.flatten()
    di, dj = i[None, :] - i[:, None], j[None, :] - j[:, None]  # key - query, [queries, keys]
    same = (di % dh == 0) & (dj % dw == 0)
    if layer.rpb is not None:
        bias = layer.rpb[:, (di // dh + kh - 1).clamp(0, 2 * kh - 2), (dj // dw + kw - 1).clamp(0, 2 * kw - 2)]
        logits = logits + bias
    if key_valid is not None:
        same = same & key_valid[None, :]
    logits = logits.masked_fill(~same, float("-inf"))
    out = (logits.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(B, H, W, C)
    return F.linear(out, layer.proj.weight, layer.proj.bias)


def _layer(*args, **kwargs):
    layer = NeighborhoodAttention2d(*args, **kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("rpb", [True, False])
def test_layer_kernel_equal_map_is_full_attention(rpb):
    layer = _layer(12, 3, (5, 7), rpb=rpb)
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _full_attention(layer, x))


def test_layer_dilated_subgrids():
    layer = _layer(8, 2, (3, 5), dilation=(2, 3))
    x = torch.randn(1, 6, 15, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _full_attention(layer, x, dilation=(2, 3)))


def test_layer_pads_small_maps_like_natten_014():
    """A 3x4 map under a 5x5 kernel: zero rows/cols are added at the bottom/right *before*
    qkv (so the padded keys hold the qkv bias and take part, unmasked), then cropped."""
    layer = _layer(8, 2, 5)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 1, 0, 2))
    expected = _full_attention(layer, padded)[:, :3, :4]
    torch.testing.assert_close(layer(x), expected)
    valid = torch.zeros(5, 5, dtype=torch.bool)
    valid[:3, :4] = True
    masked = _full_attention(layer, padded, key_valid=valid.flatten())[:, :3, :4]
    assert (masked - expected).abs().max() > 1e-3, "padded keys must take part"


def test_block_kernel_equal_map():
    """One NAT block (layer scale on) against its formula with full attention."""
    block = nat.NatBlock(16, 2, kernel_size=5, mlp_ratio=2, layer_scale=0.5).double().eval()
    _perturbed(block)
    x = torch.randn(2, 5, 5, 16, dtype=torch.float64)
    y = x + block.gamma1 * _full_attention(block.attn, block.norm1(x))
    h = F.layer_norm(y, (16,), block.norm2.weight, block.norm2.bias)
    y = y + block.gamma2 * F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                                    block.mlp.fc2.weight, block.mlp.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), y)


def test_layer_rejects_attention_dropout():
    with pytest.raises(ValueError, match="attn_drop"):
        NeighborhoodAttention2d(16, 2, 7, attn_drop=0.1)
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention2d(16, 2, 4)


# ----------------------------------------------------------------------------------------
# timm contract beyond test_models.py: odd sizes, stop_early, pruning


@pytest.mark.parametrize("name", sorted(TINY))
def test_features_odd_size(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        feats = timm.create_model(name, features_only=True).eval()
        feats.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no norm, no head
        out = feats(x)
    assert [tuple(t.shape[2:]) for t in inter] == [(17, 25), (9, 13), (5, 7), (3, 4)]
    assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
    torch.testing.assert_close(early, inter[:2])
    torch.testing.assert_close(normed[0], final.permute(0, 3, 1, 2))
    torch.testing.assert_close(out, inter)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


def test_prune_intermediate_layers():
    model = timm.create_model("test_dinat").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([1]) == [1]
        assert len(model.levels) == 2 and model.levels[1].downsample is None
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True), [full[1]])


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters
    model = timm.create_model("test_dinat")
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_output_fmt_is_nhwc(name):
    """forward_features is [B, H, W, C]: declared as timm's Swin declares it, so timm's
    test_model_default_cfgs and features_only read the layout right (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg["input_size"])
        feat = model.forward_features(x)
        assert model.output_fmt == "NHWC"
        assert feat.shape == (1, *model.pretrained_cfg["pool_size"], model.num_features)
        assert model.forward_head(feat, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).shape == feat.shape
