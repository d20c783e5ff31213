"""Agent-Swin / Agent-PVT: official configs and checkpoint layouts, and forwards checked against
oracles written here from the official code (Agent-Attention repo,
``agent_transformer/models/agent_swin.py`` and ``agent_pvt.py``), not from our modules."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.convert import convert_state_dict
from attnzoo.layers.agent import AgentAttention, agent_grid

# name: (embed_dim, depths, heads, official ATTN_TYPE) from cfgs/agent_swin_{t,s,b}.yaml
SWIN = {
    "agent_swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), "AAAB"),
    "agent_swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), "AABB"),
    "agent_swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), "AAMB2"),
}
# name: depths, from agent_pvt.py (dims 64-128-320-512, heads 1-2-5-8, mlp 8-8-4-4)
PVT = {"agent_pvt_tiny": (2, 2, 2, 2), "agent_pvt_small": (3, 4, 6, 3), "agent_pvt_medium": (3, 4, 18, 3),
       "agent_pvt_large": (3, 8, 27, 3)}
AGENTS = (9, 16, 49, 49)
PAPER_GMACS = {"agent_swin_tiny": 4.5, "agent_swin_small": 8.7, "agent_swin_base": 15.4, "agent_pvt_tiny": 2.0,
               "agent_pvt_small": 4.0, "agent_pvt_medium": 7.0, "agent_pvt_large": 10.4}


def _agent_attn_shapes(p, c, h, a, ws, kv_ws, swin):
    s = {p + "proj.weight": (c, c), p + "proj.bias": (c,), p + "dwc.weight": (c, 1, 3, 3), p + "dwc.bias": (c,),
         p + "an_bias": (h, a, 7, 7), p + "na_bias": (h, a, 7, 7), p + "ah_bias": (1, h, a, kv_ws, 1),
         p + "aw_bias": (1, h, a, 1, kv_ws), p + "ha_bias": (1, h, ws, 1, a), p + "wa_bias": (1, h, 1, ws, a)}
    if swin:
        s.update({p + "qkv.weight": (3 * c, c), p + "qkv.bias": (3 * c,)})
    else:
        s.update({p + "q.weight": (c, c), p + "q.bias": (c,), p + "kv.weight": (2 * c, c), p + "kv.bias": (2 * c,)})
    return s


def _norm_mlp(p, c, ratio):
    return {p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "norm2.weight": (c,), p + "norm2.bias": (c,),
            p + "mlp.fc1.weight": (ratio * c, c), p + "mlp.fc1.bias": (ratio * c,),
            p + "mlp.fc2.weight": (c, ratio * c), p + "mlp.fc2.bias": (c,)}


def _official_swin_shapes(name):
    """The official state_dict's keys and shapes (buffers included), from its module tree at 224 px."""
    e, depths, heads, attn_type = SWIN[name]
    s = {"patch_embed.proj.weight": (e, 3, 4, 4), "patch_embed.proj.bias": (e,), "patch_embed.norm.weight": (e,),
         "patch_embed.norm.bias": (e,), "norm.weight": (8 * e,), "norm.bias": (8 * e,),
         "head.weight": (1000, 8 * e), "head.bias": (1000,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c, res = e * 2 ** i, 56 // 2 ** i
        kind = attn_type[i] + (attn_type[4:] if attn_type[i] == "M" else "")
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update(_norm_mlp(p, c, 4))
            is_a = kind == "A" or (kind[0] == "M" and j < int(kind[1:]))
            if is_a:
                s.update(_agent_attn_shapes(p + "attn.", c, h, AGENTS[i], res, res, True))
            else:
                s.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                          p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                          p + "attn.relative_position_bias_table": (169, h),
                          p + "attn.relative_position_index": (49, 49)})
                if j % 2 and res > 7:
                    s[p + "attn_mask"] = ((res // 7) ** 2, 49, 49)
        if i < 3:
            s.update({f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,),
                      f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c)})
    return s


def _official_pvt_shapes(name):
    dims, heads, ratios = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4)
    s = {"head.weight": (1000, 512), "head.bias": (1000,)}
    for i, depth in enumerate(PVT[name]):
        c, res, cin, patch = dims[i], 56 // 2 ** i, (3, 64, 128, 320)[i], 4 if i == 0 else 2
        s.update({f"patch_embed{i + 1}.proj.weight": (c, cin, patch, patch), f"patch_embed{i + 1}.proj.bias": (c,),
                  f"patch_embed{i + 1}.norm.weight": (c,), f"patch_embed{i + 1}.norm.bias": (c,),
                  f"pos_embed{i + 1}": (1, res * res, c)})
        for j in range(depth):
            p = f"block{i + 1}.{j}."
            s.update(_norm_mlp(p, c, ratios[i]))
            s.update(_agent_attn_shapes(p + "attn.", c, heads[i], AGENTS[i], res, res, False))
    return s


@pytest.mark.parametrize("name", sorted(SWIN) + sorted(PVT))
def test_official_layout_loads_strict(name):
    """A state_dict shaped as the official model's maps onto ours key for key (meta tensors)."""
    shapes = _official_swin_shapes(name) if name in SWIN else _official_pvt_shapes(name)
    official = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = convert_state_dict({"model": official}, model, model.__module__.rsplit(".", 1)[-1])
    assert len(sd) == len(model.state_dict())
    model.load_state_dict(sd, strict=True, assign=True)


# the deepest models' count takes ~10 s each on the shared CI cores: ATTNZOO_SLOW=1 adds them
_BIG = ("agent_swin_base", "agent_pvt_medium", "agent_pvt_large")
SLOW = os.environ.get("ATTNZOO_SLOW") == "1"


@pytest.mark.parametrize("name", [n for n in sorted(PAPER_GMACS) if SLOW or n not in _BIG])
def test_gmacs_match_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    gmacs = fc.get_total_flops() / 2e9
    assert abs(gmacs / PAPER_GMACS[name] - 1) < 0.03, gmacs


# --------------------------------------------------------------------------- oracles from the official code

def _official_attention(x, H, W, prm, heads, agents, ws, sr):
    """The official AgentAttention.forward (PVT form; Swin is ``sr = 1`` with a fused qkv), x [b, n, c]."""
    b, n, c = x.shape
    hd = c // heads
    scale = hd ** -0.5
    if "qkv.weight" in prm:
        q, k, v = F.linear(x, prm["qkv.weight"], prm["qkv.bias"]).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    else:
        q = F.linear(x, prm["q.weight"], prm["q.bias"])
        x_ = x
        if sr > 1:
            x_ = F.conv2d(x.permute(0, 2, 1).reshape(b, c, H, W), prm["sr.weight"], prm["sr.bias"], stride=sr)
            x_ = F.layer_norm(x_.reshape(b, c, -1).permute(0, 2, 1), (c,), prm["norm.weight"], prm["norm.bias"])
        k, v = F.linear(x_, prm["kv.weight"], prm["kv.bias"]).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    p = int(agents ** 0.5)
    a = F.adaptive_avg_pool2d(q.reshape(b, H, W, c).permute(0, 3, 1, 2), (p, p)).reshape(b, c, -1).permute(0, 2, 1)
    q = q.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    k = k.reshape(b, n // sr ** 2, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(b, n // sr ** 2, heads, hd).permute(0, 2, 1, 3)
    a = a.reshape(b, agents, heads, hd).permute(0, 2, 1, 3)
    kv_size = (ws // sr, ws // sr)
    pb = F.interpolate(prm["an_bias"], size=kv_size, mode="bilinear").reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
    pb = pb + (prm["ah_bias"] + prm["aw_bias"]).reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
    agent_v = torch.softmax((a * scale) @ k.transpose(-2, -1) + pb, dim=-1) @ v
    ab = F.interpolate(prm["na_bias"], size=(ws, ws), mode="bilinear").reshape(1, heads, agents, -1)
    ab = ab.permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
    ab = ab + (prm["ha_bias"] + prm["wa_bias"]).reshape(1, heads, -1, agents).repeat(b, 1, 1, 1)
    out = (torch.softmax((q * scale) @ a.transpose(-2, -1) + ab, dim=-1) @ agent_v).transpose(1, 2).reshape(b, n, c)
    v = v.transpose(1, 2).reshape(b, H // sr, W // sr, c).permute(0, 3, 1, 2)
    if sr > 1:
        v = F.interpolate(v, size=(H, W), mode="bilinear")
    out = out + F.conv2d(v, prm["dwc.weight"], prm["dwc.bias"], padding=1, groups=c).permute(0, 2, 3, 1).reshape(b, n, c)
    return F.linear(out, prm["proj.weight"], prm["proj.bias"])


def _perturb(model, seed=0):
    """Random weights everywhere: zero-initialised biases and unit norms would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.3))
    return model


@pytest.mark.parametrize("sr", [None, 1, 2, 4])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_layer_matches_official(sr, backend):
    heads, agents, ws, c = 2, 9, 8, 16
    layer = _perturb(AgentAttention(c, heads, agents, bias_size=ws, sr_ratio=sr, backend=backend)).double()
    x = torch.randn(2, ws, ws, c, dtype=torch.float64)
    prm = dict(layer.named_parameters())
    want = _official_attention(x.reshape(2, -1, c), ws, ws, prm, heads, agents, ws, sr or 1)
    torch.testing.assert_close(layer(x).reshape(2, -1, c), want, rtol=1e-10, atol=1e-10)


def test_layer_any_map_and_agent_count():
    """Non-square maps (smaller and larger than the trained one) and agent counts that are not
    squares (issue #20 / #39 of the official repo) run, and both backends agree."""
    assert agent_grid(49) == (7, 7) and agent_grid(12) == (3, 4) and agent_grid(7) == (1, 7)
    for agents, sr, size in ((12, None, (5, 11)), (7, 2, (9, 4)), (49, 2, (1, 3)), (16, None, (20, 13))):
        layer = _perturb(AgentAttention(16, 2, agents, bias_size=(8, 6), sr_ratio=sr)).double()
        x = torch.randn(2, *size, 16, dtype=torch.float64)
        layer.backend = "reference"
        want = layer(x)
        layer.backend = "cpu"
        got = layer(x)
        assert got.shape == x.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _official_pvt_forward(sd, x, depths, dims, heads, ratios, agents, srs, img):
    """The official PyramidVisionTransformer.forward on an official-layout state_dict."""
    b = x.shape[0]
    for i in range(len(depths)):
        g = lambda k: sd[f"patch_embed{i + 1}.{k}"]  # noqa: E731
        x = F.conv2d(x, g("proj.weight"), g("proj.bias"), stride=g("proj.weight").shape[-1])
        H, W = x.shape[-2:]
        x = F.layer_norm(x.flatten(2).transpose(1, 2), (dims[i],), g("norm.weight"), g("norm.bias"))
        ws = img // (4 * 2 ** i)
        x = x + sd[f"pos_embed{i + 1}"]
        for j in range(depths[i]):
            p = f"block{i + 1}.{j}."
            blk = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
            attn = {k[5:]: v for k, v in blk.items() if k.startswith("attn.")}
            y = F.layer_norm(x, (dims[i],), blk["norm1.weight"], blk["norm1.bias"], eps=1e-6)
            x = x + _official_attention(y, H, W, attn, heads[i], agents[i], ws, srs[i])
            y = F.layer_norm(x, (dims[i],), blk["norm2.weight"], blk["norm2.bias"], eps=1e-6)
            y = F.linear(F.gelu(F.linear(y, blk["mlp.fc1.weight"], blk["mlp.fc1.bias"])), blk["mlp.fc2.weight"],
                         blk["mlp.fc2.bias"])
            x = x + y
        if i != len(depths) - 1:
            x = x.reshape(b, H, W, -1).permute(0, 3, 1, 2)
    return F.linear(x.mean(dim=1), sd["head.weight"], sd["head.bias"])


def _to_official_pvt(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("stages."):
            _, i, rest = k.split(".", 2)
            i = int(i) + 1
            rest = rest.replace("blocks.", "", 1) if rest.startswith("blocks.") else rest
            k = f"block{i}.{rest}" if not rest.startswith(("patch_embed", "pos_embed")) else \
                rest.replace("patch_embed", f"patch_embed{i}", 1).replace("pos_embed", f"pos_embed{i}", 1)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_pvt_matches_official_forward():
    """test_agent_pvt (spatial reduction 2 in two stages) vs the official forward, via the
    official key layout (so the converter round-trips it too)."""
    square = (4, 9, 9, 4)  # the official pooling needs square agent counts
    model = _perturb(timm.create_model("test_agent_pvt", num_classes=7, num_agents=square)).eval()
    official = _to_official_pvt(model.state_dict())
    assert "block1.0.attn.sr.weight" in official and "pos_embed3" in official and "head.weight" in official
    fresh = timm.create_model("test_agent_pvt", num_classes=7, num_agents=square).eval()
    fresh.load_state_dict(convert_state_dict({"model": official}, fresh, "agent_pvt"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    want = _official_pvt_forward(official, x, (1, 1, 2, 1), (16, 32, 32, 64), (1, 2, 2, 4), (2, 2, 2, 2),
                                 square, (2, 2, 1, 1), 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-4)


def _to_official_swin(sd, model):
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts).replace("head.fc.", "head.")] = v
    for name, m in model.named_modules():  # the official buffers are persistent
        if hasattr(m, "relative_position_index"):
            out[name + ".relative_position_index"] = m.relative_position_index
        if getattr(m, "shift_size", (0, 0)) != (0, 0) and hasattr(m, "get_attn_mask"):
            out[name + ".attn_mask"] = m.get_attn_mask(device="cpu", dtype=torch.float32)
    return out


def test_swin_official_layout_round_trip():
    model = _perturb(timm.create_model("test_agent_swin", num_classes=5)).eval()
    official = _to_official_swin(model.state_dict(), model)
    assert "layers.0.downsample.reduction.weight" in official and "layers.2.blocks.1.attn_mask" in official
    fresh = timm.create_model("test_agent_swin", num_classes=5).eval()
    fresh.load_state_dict(convert_state_dict(official, fresh, "agent_swin"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["test_agent_swin", "test_agent_pvt"])
def test_other_agents_and_img_size_load(name):
    """A checkpoint loads into a model with other agent counts and training size: the agent
    biases (and PVT position embeddings) are resized (official issue #20)."""
    src = _perturb(timm.create_model(name, num_classes=3))
    dst = timm.create_model(name, num_classes=3, num_agents=(9, 4, 12, 16), img_size=96).eval()
    fam = dst.__module__.rsplit(".", 1)[-1]
    dst.load_state_dict(convert_state_dict(src.state_dict(), dst, fam), strict=True)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 96, 80))).all()


@pytest.mark.parametrize("name", ["agent_swin_tiny", "agent_pvt_tiny"])
def test_full_models_take_192x256(name):
    """The official models fail here (Swin asserts 224 x 224; PVT's position embeddings mismatch)."""
    model = timm.create_model(name, num_classes=4).eval()
    with torch.no_grad():
        out, feats = model.forward_intermediates(torch.randn(1, 3, 192, 256))
    assert [f.shape[-2:] for f in feats] == [(48, 64), (24, 32), (12, 16), (6, 8)]
    assert torch.isfinite(model.forward_head(out)).all()


@pytest.mark.parametrize("name", ["agent_swin_tiny", "agent_pvt_tiny"])
def test_channels_last_and_output_fmt(name):
    """``model.to(memory_format=torch.channels_last)`` (tools/train.py --channels-last) failed on the
    5-D row / column biases; they are 4-D parameters now, and the state dict keeps the official
    5-D shapes. forward_features is NHWC and says so, as timm's Swin (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.to(memory_format=torch.channels_last)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before
    key = next(k for k in before if k.endswith("ah_bias"))
    assert before[key] == (1, 1 if "pvt" in name else 3, 9, 56, 1)
    assert model.output_fmt == "NHWC"
    with torch.device("meta"):
        feat = model.forward_features(torch.empty(1, 3, 224, 224))
    assert feat.shape == (1, 7, 7, model.num_features)


def test_row_col_biases_state_dict_round_trip():
    """The state dict's 5-D biases are views of the 4-D parameters (in-place updates through it,
    as timm's ModelEmaV3 makes, reach the model) and load back, strict, plain or assigned."""
    model = _perturb(timm.create_model("test_agent_pvt", num_classes=3)).eval()
    sd = model.state_dict()
    names = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")
    for k, v in sd.items():
        if k.endswith(names):
            param = model.get_parameter(k)
            assert v.dim() == 5 and v.shape[0] == 1 and param.dim() == 4 and torch.equal(v[0], param)
    key = "stages.0.blocks.0.attn.ha_bias"
    with torch.no_grad():
        sd[key].add_(1.0)
    assert torch.equal(model.get_parameter(key), sd[key][0])
    x = torch.randn(1, 3, 64, 64)
    for assign in (False, True):
        fresh = timm.create_model("test_agent_pvt", num_classes=3).eval()
        fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=assign)
        assert fresh.get_parameter(key).dim() == 4
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
