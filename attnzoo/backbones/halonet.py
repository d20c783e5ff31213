"""HaloNets on attnzoo's halo attention.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones", CVPR 2021. Paper: https://arxiv.org/abs/2103.12731 (no official code).

``attn_halonet26t`` / ``attn_halonet50ts`` are timm's ``halonet26t`` / ``halonet50ts``
(``timm/models/byoanet.py``: timm's ``ByobNet`` with its model config) with every
``HaloAttn`` replaced by ``attnzoo.layers.halo.HaloAttention``, which runs on
``attnzoo.ops.neighborhood.na2d(border="zero_pad")``. Module tree and parameter names are
timm's, so timm's checkpoints (``halonet26t.a1h_in1k``, ``halonet50ts.a1h_in1k``) load by
name, and the outputs match timm's model on inputs whose every halo stage is a multiple
of the block size (256 px native). Unlike timm's, ours take any input size (timm asserts
divisibility by the block size); off-multiple maps behave as if zero-padded bottom / right.

``haloattn_h0`` ... ``haloattn_h7`` are the paper's HaloNet-H0..H7 (untrained), laid out as
timm's ``halonet_h1`` (``haloattn_h1`` equals it: same parameters, same outputs). For H5-H7
the value multiplier ``rv > 1`` widens only the values (and so the attention output and
the last 1x1 conv's input); queries and keys keep the bottleneck width, see
``ValueWideSelfAttnBlock``. Their parameter counts match the paper's table.

The names differ from timm's on purpose: attnzoo never shadows a timm model.
"""
from dataclasses import replace
from functools import partial
from typing import Any, Dict

from timm.models import generate_default_cfgs
from timm.models.byoanet import model_cfgs as _timm_byoa_cfgs
from timm.layers import make_divisible
from timm.models.byobnet import ByoBlockCfg, ByoModelCfg, ByobNet, SelfAttnBlock
from timm.models.byobnet import checkpoint_filter_fn as _byob_filter_fn

from .._registry import register_model
from ..layers.halo import HaloAttention
from ._helpers import cfg, unwrap_state_dict
from ._pretrained import build_model

__all__ = ["halo_model_cfg"]


def _swap_halo(layer):
    return HaloAttention if layer == "halo" else layer


def halo_model_cfg(model_cfg: ByoModelCfg) -> ByoModelCfg:
    """A timm ``ByoModelCfg`` with ``'halo'`` self-attention (model- and block-level) swapped for ours."""
    def block(b: ByoBlockCfg) -> ByoBlockCfg:
        return replace(b, self_attn_layer=_swap_halo(b.self_attn_layer))

    blocks = tuple(tuple(block(b) for b in x) if isinstance(x, (tuple, list)) else block(x) for x in model_cfg.blocks)
    return replace(model_cfg, blocks=blocks, self_attn_layer=_swap_halo(model_cfg.self_attn_layer))


class ValueWideSelfAttnBlock(SelfAttnBlock):
    """timm's ``SelfAttnBlock`` whose attention values are ``value_ratio`` times wider than
    its q / k (HaloNet's ``rv``): 1x1 -> halo attention (q, k at the bottleneck width, v and
    output at ``rv`` x it) -> BN-act -> 1x1. With ``value_ratio=1`` it is ``SelfAttnBlock``."""

    def __init__(self, in_chs: int, out_chs: int, *args, value_ratio: float = 1.0, **kwargs):
        super().__init__(in_chs, out_chs, *args, **kwargs)
        if value_ratio == 1.0:
            return
        layers, stride = kwargs["layers"], kwargs.get("stride", 1)
        mid = self.conv1_1x1.conv.out_channels
        wide = make_divisible(mid * value_ratio)
        # rebuilt rather than re-implementing timm's constructor: only these three widen
        self.self_attn = layers.self_attn(mid, dim_out=wide, stride=stride, qk_ratio=mid / wide)
        self.post_attn = layers.norm_act(wide)
        self.conv3_1x1 = layers.conv_norm_act(wide, out_chs, 1, apply_act=False)


def _h_cfg(b: int, h: int, rv: float, rb: float, l3: int, df: int = 0) -> ByoModelCfg:
    """The paper's HaloNet-H family (appendix table: block ``b``, halo ``h``, value multiplier
    ``rv``, bottleneck-output multiplier ``rb``, stage-3 depth ``l3``, final 1x1 conv ``df``), laid
    out as timm's ``halonet_h1`` config (7x7 stem + max pool, halo attention in every block,
    stride-2 halo blocks downsample): stage ``i`` has q / k width ``64 * 2**i``, values
    ``rv`` times that, and outputs ``rb`` times it. timm only ships H1 (untrained); ours equals it."""
    c = [int(64 * m * rb) for m in (1, 2, 4, 8)]
    block = "self_attn" if rv == 1.0 else partial(ValueWideSelfAttnBlock, value_ratio=rv)
    return ByoModelCfg(
        blocks=tuple(
            ByoBlockCfg(type=block, d=d, c=ch, s=s, gs=0, br=1 / rb)
            for d, ch, s in zip((3, 3, l3, 3), c, (1, 2, 2, 2))),
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=df,
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=b, halo_size=h),
    )


# name: (b, h, rv, rb, l3, df, image size), the paper's appendix table.
_H_SERIES = {
    "haloattn_h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "haloattn_h1": (8, 3, 1.0, 1.0, 10, 0, 256),
    "haloattn_h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "haloattn_h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "haloattn_h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "haloattn_h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "haloattn_h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "haloattn_h7": (10, 3, 4.0, 3.5, 26, 2048, 600),
}


model_cfgs = dict(
    attn_halonet26t=halo_model_cfg(_timm_byoa_cfgs["halonet26t"]),
    attn_halonet50ts=halo_model_cfg(_timm_byoa_cfgs["halonet50ts"]),
    # tiny variant for tests: halo attention in the last two stages, incl. a stride-2 halo block
    test_attn_halonet=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=1, c=48, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=96, s=2, gs=0, br=0.25),
        ),
        stem_chs=16,
        stem_type="tiered",
        stem_pool="maxpool",
        act_layer="silu",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2),
    ),
    **{name: _h_cfg(*args[:6]) for name, args in _H_SERIES.items()},
)


def checkpoint_filter_fn(state_dict, model=None):
    """timm HaloNet checkpoints (``halonet26t``, ``halonet50ts``, raw or wrapped) load by name:
    our module tree is timm's ``ByobNet`` and ``HaloAttention`` keeps ``HaloAttn``'s parameter names."""
    return _byob_filter_fn(unwrap_state_dict(state_dict), model)


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> ByobNet:
    return build_model(
        ByobNet, variant, pretrained,
        model_cfg=model_cfgs[variant],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # timm's byoanet defaults (the checkpoints' eval settings)
    return cfg(url, **dict(dict(
        input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.95, interpolation="bicubic",
        first_conv="stem.conv1.conv", classifier="head.fc", license="apache-2.0",
        paper_ids="arXiv:2103.12731",
        paper_name="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        origin_url="https://github.com/huggingface/pytorch-image-models"), **kwargs))


_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-attn-weights/"

default_cfgs = generate_default_cfgs({
    # timm's weights for timm's halonet26t / halonet50ts (same keys, loaded through checkpoint_filter_fn)
    "attn_halonet26t.a1h_in1k": _cfg(_TIMM_RELEASE + "halonet26t_a1h_256-3083328c.pth"),
    "attn_halonet50ts.a1h_in1k": _cfg(_TIMM_RELEASE + "halonet50ts_a1h2_256-f3a3daee.pth", crop_pct=0.94),
    "test_attn_halonet.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    **{f"{name}.untrained": _cfg(input_size=(3, a[6], a[6]), pool_size=(a[6] // 32, a[6] // 32),
                                 crop_pct=0.875, origin_url="https://arxiv.org/abs/2103.12731")
       for name, a in _H_SERIES.items()},
})


@register_model
def attn_halonet26t(pretrained=False, **kwargs) -> ByobNet:
    """timm's ``halonet26t`` (ResNet26-T, halo attention in the last two stages, block 8, halo 2)."""
    return _create_halonet("attn_halonet26t", pretrained, **kwargs)


@register_model
def attn_halonet50ts(pretrained=False, **kwargs) -> ByobNet:
    """timm's ``halonet50ts`` (ResNet50-T, SiLU, halo attention in stages 2-4, block 8, halo 3)."""
    return _create_halonet("attn_halonet50ts", pretrained, **kwargs)


@register_model
def test_attn_halonet(pretrained=False, **kwargs) -> ByobNet:
    """Tiny variant for tests (block 4, halo 1, a stride-2 halo block)."""
    return _create_halonet("test_attn_halonet", pretrained, **kwargs)


@register_model
def haloattn_h0(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H0 (paper; b=8, h=3, rv=1, rb=0.5, l3=7, 256 px). Untrained."""
    return _create_halonet("haloattn_h0", pretrained, **kwargs)


@register_model
def haloattn_h1(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H1 (b=8, h=3, rv=1, rb=1, l3=10, 256 px) = timm's ``halonet_h1``. Untrained."""
    return _create_halonet("haloattn_h1", pretrained, **kwargs)


@register_model
def haloattn_h2(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H2 (b=8, h=3, rv=1, rb=1.25, l3=11, 256 px). Untrained."""
    return _create_halonet("haloattn_h2", pretrained, **kwargs)


@register_model
def haloattn_h3(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H3 (b=10, h=3, rv=1, rb=1.5, l3=12, df=1024, 320 px). Untrained."""
    return _create_halonet("haloattn_h3", pretrained, **kwargs)


@register_model
def haloattn_h4(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H4 (b=12, h=2, rv=1, rb=3, l3=12, df=1280, 384 px). Untrained."""
    return _create_halonet("haloattn_h4", pretrained, **kwargs)


@register_model
def haloattn_h5(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H5 (b=14, h=2, rv=2.5, rb=2, l3=23, df=1536, 448 px). Untrained."""
    return _create_halonet("haloattn_h5", pretrained, **kwargs)


@register_model
def haloattn_h6(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H6 (b=8, h=4, rv=3, rb=2.75, l3=24, df=1536, 512 px). Untrained."""
    return _create_halonet("haloattn_h6", pretrained, **kwargs)


@register_model
def haloattn_h7(pretrained=False, **kwargs) -> ByobNet:
    """HaloNet-H7 (b=10, h=3, rv=4, rb=3.5, l3=26, df=2048, 600 px). Untrained."""
    return _create_halonet("haloattn_h7", pretrained, **kwargs)
