"""BiFormer: vision transformer with bi-level routing attention.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023.
Paper: https://arxiv.org/abs/2303.08810
Official code: https://github.com/rayleizhu/BiFormer (``models/biformer.py``, ``ops/bra_legacy.py``).

Four stages of pre-norm blocks, each ``x + dwconv3x3(x)`` then bi-level routing
attention (``topks`` regions of an ``n_win x n_win`` grid; the last stage, ``topk=-2``
officially, is plain attention with LePE) and an MLP; BN conv stem and downsamplers,
a final BatchNorm. The module tree is the official one (``downsample_layers.i``,
``stages.i.j.{pos_embed, norm1, attn, norm2, mlp}``, ``norm``) so official checkpoints
load by name; only the classifier moves to timm's ``ClassifierHead`` (``head`` -> ``head.fc``).

Unlike the official classification model (``auto_pad=False``), any input size works:
the routing op pads each map to a multiple of ``n_win`` and masks the padding out
(192x256 at ``n_win=7`` gives a 48x64 first stage; the official code asserts there).
``n_win`` is a model argument (the official detection / segmentation configs use 16 / 8).

Official checkpoints (``{'model': state_dict}``; OneDrive links in the official README):
``biformer_{tiny,small,base}_in1k``.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, ClassifierHead, DropPath
from timm.models import generate_default_cfgs

from .._registry import register_model
from ..layers.bra import BiLevelRoutingAttention
from ._helpers import (
    ClassifierHeadMixin, StagedFeaturesMixin, cfg, init_linear_layernorm, remap_keys, unwrap_state_dict)
from ._pretrained import build_model

__all__ = ["BiFormer"]


class AttentionLePE(nn.Module):
    """Global multi-head attention plus a depthwise conv of the *input* (official ``AttentionLePE``,
    the ``topk=-2`` stage): ``proj(attn(x) + lepe(x))``; no qkv bias, ``head_dim ** -0.5`` scale.
    ``side_dwconv=0``: no LePE (official ``Attention``, the ``topk=-1`` stage)."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionLePE: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """NCHW in / out (fastest channels_last, which the result keeps): ``x + pos_embed(x)``, then
    pre-norm attention and MLP in NHWC (official ``Block``)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_win: int = 7,
            topk: int = 4,
            mlp_ratio: float = 3.0,
            side_dwconv: int = 5,
            dense_heads: int = 8,
            drop_path: float = 0.0,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        # the official meanings: > 0 routing, -1 plain attention, -2 attention with LePE
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, side_dwconv=side_dwconv)
        elif topk in (-1, -2):
            self.attn = AttentionLePE(dim, dense_heads, side_dwconv if topk == -2 else 0)
        else:
            raise ValueError(f"BiFormerBlock: topk must be > 0, -1 (attention) or -2 (attention + LePE), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # official layout (keys mlp.0 / mlp.3): Linear, Identity (its unused DWConv slot), GELU, Linear
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Sequential):
    """The blocks of one resolution (keys ``stages.i.j``), optionally gradient-checkpointed."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last through the blocks (and so the next downsampler): the blocks' NHWC permutes
        # are then free views and oneDNN's depthwise convs run faster on it
        x = x.contiguous(memory_format=torch.channels_last)
        for blk in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))


class BiFormer(ClassifierHeadMixin, StagedFeaturesMixin, nn.Module):
    """BiFormer with the timm model contract.

    Features are NCHW between stages; ``forward_features`` returns the final
    BatchNorm-ed ``[B, C, H, W]`` map and ``forward_intermediates`` each stage's output,
    at reductions 4/8/16/32.

    Args:
        depths, embed_dims: blocks and channels per stage.
        head_dim: channels per head of the routing stages (heads = ``dim // head_dim``).
        n_win: regions per side of every routing stage.
        topks: per stage, regions per region (>= n_win**2: all); -1 plain attention, -2 attention + LePE.
        mlp_ratio: MLP hidden / dim.
        side_dwconv: LePE kernel size.
        dense_heads: heads of the ``topk=-2`` attention (the official ``AttentionLePE`` default, 8).
        num_classes, in_chans, global_pool: as timm.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over all blocks (0.1: the official
            ``configs/train_args.yaml`` default; the model code's own default is 0).
    """
    feature_fmt = "NCHW"

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 8, 2),
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            head_dim: int = 32,
            n_win: int = 7,
            topks: Sequence[int] = (1, 4, 16, -2),
            mlp_ratio: float = 3.0,
            side_dwconv: int = 5,
            dense_heads: int = 8,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if not (len(depths) == len(embed_dims) == len(topks)):
            raise ValueError(f"depths {depths}, embed_dims {embed_dims} and topks {topks} need one entry per stage")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.downsample_layers = nn.ModuleList([_stem(in_chans, embed_dims[0])] + [
            nn.Sequential(nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, stride=2, padding=1),
                          nn.BatchNorm2d(embed_dims[i + 1]))
            for i in range(len(depths) - 1)])
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # per stage, linear over blocks
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            self.stages.append(BiFormerStage(*[
                BiFormerBlock(dim, dim // head_dim, n_win, topks[i], mlp_ratio, side_dwconv, dense_heads,
                              drop_path=dpr[i][j])
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        # as the official model; convs and BN keep PyTorch's defaults
        self.apply(init_linear_layernorm)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^downsample_layers\.0",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)", None),
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def _stage_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.downsample_layers[i](x)

    def _prune_stages(self, num_stages: int) -> None:
        super()._prune_stages(num_stages)
        self.downsample_layers = self.downsample_layers[:num_stages]


# official keys are ours but the classifier: head -> head.fc (timm's ClassifierHead)
_OFFICIAL_KEYS = ((r"^head\.(weight|bias)$", r"head.fc.\1"),)


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official BiFormer checkpoint (``{'model': sd}``, raw or DataParallel) to ours."""
    return remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_KEYS)


def _create_biformer(variant, pretrained=False, **kwargs):
    return build_model(
        BiFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    # official eval: resize 256 bicubic, centre crop 224, ImageNet mean / std
    return cfg(**dict(dict(
        first_conv="downsample_layers.0.0", classifier="head.fc", interpolation="bicubic", license="mit",
        paper_ids="arXiv:2303.08810", paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        origin_url="https://github.com/rayleizhu/BiFormer"), **kwargs))


# the OneDrive API links of the official models/biformer.py (model_urls) and README: {'model', ...,
# 'args'} checkpoints; 'model' is what the official loader takes (not 'model_ema')
_ONEDRIVE_URL = "https://api.onedrive.com/v1.0/shares/{}/root/content"
_NOTES = ("OneDrive names every file 'content': cached as <model>.<tag>_<digest>.pth. BiFormer issue #53 "
          "(2026-03) reports these links failing ('The provided share id was malformed'); the same files are "
          "in the OneDrive folder https://1drv.ms/u/s!AkBbczdRlZvChGsXFqAA-PVnA-R8?e=IPlOCG. A checkpoint "
          "written by hydra_main.py keeps an OmegaConf 'args', which weights-only loading refuses (the real "
          "files were not checked).",)

default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(url=_ONEDRIVE_URL.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"), notes=_NOTES),
    "biformer_small.in1k": _cfg(url=_ONEDRIVE_URL.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"), notes=_NOTES),
    "biformer_base.in1k": _cfg(url=_ONEDRIVE_URL.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"), notes=_NOTES),
    "test_biformer.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def biformer_tiny(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M params, 2.2 GMACs at 224."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M params, 4.5 GMACs at 224."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8M params, 9.8 GMACs at 224."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(model_args, **kwargs))


@register_model
def test_biformer(pretrained=False, **kwargs) -> BiFormer:
    """Tiny BiFormer for tests: 16-channel heads, a 3x3 region grid, routing to 1, 4 and all 9 regions."""
    model_args = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 32, 64), head_dim=16, n_win=3, topks=(1, 4, 9, -2),
                      dense_heads=4)
    return _create_biformer("test_biformer", pretrained, **dict(model_args, **kwargs))
