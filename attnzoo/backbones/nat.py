"""NAT and DiNAT: (dilated) neighborhood attention transformers.

Hassani et al., "Neighborhood Attention Transformer", CVPR 2023.
Paper: https://arxiv.org/abs/2204.07143
Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022.
Paper: https://arxiv.org/abs/2209.15001
Official code: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer
(``classification/nat.py``, ``classification/dinat.py``; NATTEN 0.14.4).

DiNAT is NAT with per-block dilations: every other block of a level attends a
sub-grid of step ``map_size // kernel_size`` at 224 px (8, 4, 2, 1 over the
levels), the others are plain NA. The module tree follows the official one
(``patch_embed``, ``levels.i.blocks.j``, ``levels.i.downsample`` at the *end* of
a level, ``norm``) so official checkpoints load by name; only the classifier
moves to timm's ``ClassifierHead`` (``head`` -> ``head.fc``).

Official checkpoints (raw state_dicts):
``https://shi-labs.com/projects/nat/checkpoints/CLS/nat_{mini,tiny,small,base}.pth``,
``https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_{mini,tiny,small,base}_in1k_224.pth``,
``.../imagenet1k/dinat_large_in22k_in1k_224.pth``, ``.../imagenet22k/dinat_large_in22k_224.pth``.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, ClassifierHead, DropPath, Mlp
from timm.models import generate_default_cfgs

from .._registry import register_model
from ..layers.neighborhood import NeighborhoodAttention2d
from ._helpers import (
    ClassifierHeadMixin, StagedFeaturesMixin, cfg, init_linear_layernorm, remap_keys, unwrap_state_dict)
from ._pretrained import build_model

__all__ = ["NeighborhoodAttentionTransformer"]


class ConvTokenizer(nn.Module):
    """Two stride-2 3x3 convs (no activation between them), then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last in: both convs take oneDNN's NHWC kernels (on CPU ~2x faster forward and
        # backward than from NCHW) and the permute to NHWC is a view, not a copy before the norm
        return self.norm(self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv (no bias) doubling the channels, then LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NatBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention (official ``NATLayer``).

    ``layer_scale`` (a number) adds the per-channel scales ``gamma1`` / ``gamma2``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            layer_scale: Optional[float] = None,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias,
                                            attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma1 * y if self.layer_scale else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma2 * y if self.layer_scale else y)


class NatLevel(nn.Module):
    """One resolution (official ``NATBlock``): the blocks, then the optional downsampler."""

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            kernel_size: int,
            dilations: Optional[Sequence[int]] = None,
            downsample: bool = True,
            drop_path: Sequence[float] = (),
            norm_layer=nn.LayerNorm,
            **block_kwargs,
    ):
        super().__init__()
        dilations = dilations or [1] * depth
        drop_path = list(drop_path) or [0.0] * depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            NatBlock(dim, num_heads, kernel_size, dilation=dilations[i], drop_path=drop_path[i],
                     norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])
        self.downsample = ConvDownsampler(dim, norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class NeighborhoodAttentionTransformer(ClassifierHeadMixin, StagedFeaturesMixin, nn.Module):
    """NAT / DiNAT with the timm model contract.

    Features are channels-last inside; ``forward_features`` returns the normed
    ``[B, H, W, C]`` map and ``forward_intermediates`` NCHW maps, one per level
    (the blocks' output, before that level's downsampler), at reductions 4/8/16/32.

    Args:
        depths, num_heads: blocks and heads per level.
        embed_dim: channels of the first level (doubled at every level).
        mlp_ratio: MLP hidden / dim.
        kernel_size: neighborhood size.
        dilations: per level, per block dilation (None: NAT, all 1).
        layer_scale: initial value of ``gamma1``/``gamma2`` (None: no layer scale).
        num_classes, in_chans, global_pool: as timm.
        drop_rate: dropout before the classifier (timm's meaning; the official model has none).
        proj_drop_rate: the official ``drop_rate``: after the tokenizer, the attention projection and the MLP.
        attn_drop_rate: must be 0 (fused op).
        drop_path_rate: stochastic depth, linear over all blocks.
    """
    stages_attr = "levels"
    trailing_downsample = True

    def __init__(
            self,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            embed_dim: int = 64,
            mlp_ratio: float = 3.0,
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            layer_scale: Optional[float] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.2,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        num_levels = len(depths)
        if len(num_heads) != num_levels:
            raise ValueError(f"num_heads {num_heads} must have one entry per level of depths {depths}")
        if dilations is not None and [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations {dilations} must have one entry per block of depths {depths}")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        dims = [int(embed_dim * 2 ** i) for i in range(num_levels)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"  # forward_features' layout, read by timm (as on its Swin)

        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
        self.pos_drop = nn.Dropout(proj_drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # per stage, linear over blocks
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(num_levels):
            self.levels.append(NatLevel(
                dims[i], depths[i], num_heads[i], kernel_size,
                dilations=None if dilations is None else dilations[i],
                downsample=i < num_levels - 1,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                layer_scale=layer_scale,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"levels.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        # as the official model; convs keep PyTorch's default, rpb its trunc_normal(0.02)
        self.apply(init_linear_layernorm)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"rpb"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))


# official keys are ours but the classifier: head -> head.fc (timm's ClassifierHead)
_OFFICIAL_KEYS = ((r"^head\.(weight|bias)$", r"head.fc.\1"),)


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official NAT / DiNAT classification checkpoint (raw state_dict or wrapped) to ours."""
    return remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_KEYS)


def _create_nat(variant, pretrained=False, **kwargs):
    return build_model(
        NeighborhoodAttentionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    # the official validate.py falls back to timm's defaults: bicubic, crop 0.875
    return cfg(**dict(dict(
        first_conv="patch_embed.proj.0", classifier="head.fc", interpolation="bicubic", license="mit",
        paper_ids="arXiv:2204.07143", paper_name="Neighborhood Attention Transformer",
        origin_url="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"), **kwargs))


def _dinat_cfg(**kwargs):
    return _cfg(**dict(dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer"),
                       **kwargs))


# direct links of the official classification/{nat,dinat}.py (model_urls) and NAT.md / DiNAT.md; raw state_dicts
_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"

default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg(url=_NAT_URL + "nat_mini.pth"),
    "nat_tiny.in1k": _cfg(url=_NAT_URL + "nat_tiny.pth"),
    "nat_small.in1k": _cfg(url=_NAT_URL + "nat_small.pth"),
    "nat_base.in1k": _cfg(url=_NAT_URL + "nat_base.pth"),
    "dinat_mini.in1k": _dinat_cfg(url=_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth"),
    "dinat_tiny.in1k": _dinat_cfg(url=_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth"),
    "dinat_small.in1k": _dinat_cfg(url=_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth"),
    "dinat_base.in1k": _dinat_cfg(url=_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth"),
    "dinat_large.in22k_ft_in1k": _dinat_cfg(
        url=_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth",
        notes=("The 384 px fine-tunes (dinat_large_in22k_in1k_384.pth: dilations 13/6/3; "
               "dinat_large_in22k_in1k_384_11x11.pth: kernel 11) are other architectures, not registered.",)),
    "dinat_large.in22k": _dinat_cfg(url=_DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", num_classes=21841),
    "test_nat.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    "test_dinat.untrained": _dinat_cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})

# DiNAT dilations at 224 px, per level and block, from the official classification/dinat.py:
# every other block attends the sub-grid of step (56, 28, 14, 7) // 7; the last level is plain NA
_DILATIONS_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
_DILATIONS = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)

_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2)
_TINY = dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3, drop_path_rate=0.2)
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2, drop_path_rate=0.3)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2, drop_path_rate=0.5,
             layer_scale=1e-5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2, drop_path_rate=0.35)


@register_model
def nat_mini(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """NAT-Mini: 20.0M params."""
    return _create_nat("nat_mini", pretrained, **dict(_MINI, **kwargs))


@register_model
def nat_tiny(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """NAT-Tiny: 27.9M params."""
    return _create_nat("nat_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def nat_small(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """NAT-Small: 50.7M params; unlike DiNAT-Small it has layer scale (1e-5)."""
    model_args = dict(_SMALL, layer_scale=1e-5)
    return _create_nat("nat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """NAT-Base: 89.8M params."""
    return _create_nat("nat_base", pretrained, **dict(_BASE, **kwargs))


@register_model
def dinat_mini(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """DiNAT-Mini: 20.0M params."""
    model_args = dict(_MINI, dilations=_DILATIONS_MINI)
    return _create_nat("dinat_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """DiNAT-Tiny: 27.9M params."""
    model_args = dict(_TINY, dilations=_DILATIONS)
    return _create_nat("dinat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """DiNAT-Small: 50.7M params; the official config has no layer scale (NAT-Small has)."""
    model_args = dict(_SMALL, dilations=_DILATIONS)
    return _create_nat("dinat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """DiNAT-Base: 89.8M params."""
    model_args = dict(_BASE, dilations=_DILATIONS)
    return _create_nat("dinat_base", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """DiNAT-Large at 224 px (the official ImageNet-22k and 22k->1k checkpoints)."""
    model_args = dict(_LARGE, dilations=_DILATIONS)
    return _create_nat("dinat_large", pretrained, **dict(model_args, **kwargs))


@register_model
def test_nat(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """Tiny NAT for tests: kernel 3, 16 channels, layer scale."""
    model_args = dict(depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), embed_dim=16, mlp_ratio=2, kernel_size=3,
                      layer_scale=0.5, drop_path_rate=0.1)
    return _create_nat("test_nat", pretrained, **dict(model_args, **kwargs))


@register_model
def test_dinat(pretrained=False, **kwargs) -> NeighborhoodAttentionTransformer:
    """Tiny DiNAT for tests: kernel 3, dilations up to 4 (padding at 64 px and below)."""
    model_args = dict(depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), embed_dim=16, mlp_ratio=2, kernel_size=3,
                      dilations=((4,), (2,), (1, 2), (1,)), drop_path_rate=0.1)
    return _create_nat("test_dinat", pretrained, **dict(model_args, **kwargs))
