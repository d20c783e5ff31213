"""MAViT: vision transformers with magnitude-aware linear attention (MALA).

Fan et al., "Rectifying Magnitude Neglect in Linear Attention", ICCV 2025.
Paper: https://arxiv.org/abs/2507.00698
Official code: https://github.com/qhfan/MALA (``classfication_release/model.py``).

A conv stem (four 3x3 convs with BN, reduction 4), four stages of pre-norm blocks
(3x3 depthwise positional conv, attention, conv FFN with a depthwise conv, layer scales),
stride-2 conv + BN downsamplers at the *end* of each stage but the last, then a 1x1 conv
to ``projection`` channels, BN and swish before the average pool. The attention of each
stage is a class (``attn_layers``): the released models use MALA in stages 1-2 and
softmax attention in stages 3-4 (the official default ``flagss``), so every released
MAViT is a hybrid; both take 2-D RoPE tables computed per stage for the map at hand, so
any input size works (every conv rounds up: feature maps are ``ceil(size / reduction)``).

The module tree is the official one (``patch_embed.proj``, ``layers.i.RoPE.angle``,
``layers.i.blocks.j.{pos, norm1.norm, attn.{qkvo, lepe, proj}, norm2.norm, ffn.{fc1,
dwconv, fc2}, gamma_1, gamma_2}``, ``layers.i.downsample``, ``proj``, ``norm``) so official
checkpoints load by name; only the 1x1-conv classifier becomes timm's ``ClassifierHead``
(``head.weight [n, C, 1, 1]`` -> ``head.fc.weight [n, C]``).
"""
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import calculate_drop_path_rates, ClassifierHead, DropPath
from timm.models import generate_default_cfgs

from .._registry import register_model
from ..layers.mala import MagnitudeAwareLinearAttention, RopeSoftmaxAttention, RotaryEmbedding2d, pointwise
from ._helpers import (
    ClassifierHeadMixin, StagedFeaturesMixin, cfg, init_linear_layernorm, remap_keys, unwrap_state_dict)
from ._pretrained import build_model

__all__ = ["MAViT"]

#: the released models: MALA in stages 1-2, softmax attention in stages 3-4 (official ``flagss``)
HYBRID = (MagnitudeAwareLinearAttention, MagnitudeAwareLinearAttention, RopeSoftmaxAttention, RopeSoftmaxAttention)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map, held as ``.norm`` (official layout)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvFfn(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv with a residual, 1x1 conv (official ``FeedForwardNetwork``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(pointwise(self.fc1, x))
        return pointwise(self.fc2, x + self.dwconv(x))


class MalaBlock(nn.Module):
    """``x + pos(x)``, then attention and FFN, each pre-norm with a per-channel layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_layer: Type[nn.Module],
                 drop_path: float = 0.0, layer_scale: Optional[float] = 1.0):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = attn_layer(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.ffn = ConvFfn(dim, int(mlp_ratio * dim))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(1, dim, 1, 1))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.pos(x)
        y = self.attn(self.norm1(x), rope)
        x = x + self.drop_path(self.gamma_1 * y if self.layer_scale else y)
        y = self.ffn(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * y if self.layer_scale else y)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN (official ``PatchMerging``)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class MalaStage(nn.Module):
    """One resolution (official ``BasicLayer``): RoPE tables for the map, the blocks, the downsampler."""

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, num_heads: int, mlp_ratio: float,
                 attn_layer: Type[nn.Module], drop_path: Sequence[float], layer_scale: Optional[float]):
        super().__init__()
        self.grad_checkpointing = False
        self.RoPE = RotaryEmbedding2d(dim, num_heads)
        self.blocks = nn.ModuleList([
            MalaBlock(dim, num_heads, mlp_ratio, attn_layer, drop_path[i], layer_scale) for i in range(depth)])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.RoPE(x.shape[2], x.shape[3])
        # channels_last through the blocks (and so the downsampler): 1x1 convs are GEMMs over
        # tokens, oneDNN's depthwise convs are faster, LayerNorm needs no permute copies
        x = x.contiguous(memory_format=torch.channels_last)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    half = dim // 2
    layers = []
    for i, (cin, cout, stride) in enumerate(((in_chans, half, 2), (half, half, 1), (half, half, 1), (half, dim, 2))):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout)]
        if i < 3:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = _stem(in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MAViT(ClassifierHeadMixin, StagedFeaturesMixin, nn.Module):
    """MAViT (official class ``MALA``) with the timm model contract.

    ``forward_features`` returns the ``projection``-channel map after ``proj``, BN and swish
    (the official model pools that); ``forward_intermediates`` gives each stage's blocks'
    output (before its downsampler), NCHW, at reductions 4/8/16/32.

    Args:
        embed_dims, depths, num_heads: per stage.
        mlp_ratio: FFN hidden / dim.
        attn_layers: per stage, the attention class (``MagnitudeAwareLinearAttention`` or
            ``RopeSoftmaxAttention``; any ``(dim, num_heads)`` module taking ``(x, rope)``).
            Default: the released hybrid, ``HYBRID``.
        layer_scales: per stage, the initial value of ``gamma_1`` / ``gamma_2`` (None: none).
        projection: channels of the 1x1 conv before the pool.
        num_classes, in_chans, global_pool: as timm.
        drop_rate: dropout before the classifier (the official model has none).
        drop_path_rate: stochastic depth, linear over all blocks.
    """
    stages_attr = "layers"
    trailing_downsample = True
    feature_fmt = "NCHW"
    output_fmts = ("NCHW",)
    final_norm = False  # the final BN acts on the projected map: intermediates are never normed

    def __init__(
            self,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratio: float = 3.5,
            attn_layers: Sequence[Type[nn.Module]] = HYBRID,
            layer_scales: Sequence[Optional[float]] = (1.0, 1.0, 1.0, 1.0),
            projection: int = 2048,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
    ):
        super().__init__()
        n = len(depths)
        for name, seq in (("embed_dims", embed_dims), ("num_heads", num_heads), ("attn_layers", attn_layers),
                          ("layer_scales", layer_scales)):
            if len(seq) != n:
                raise ValueError(f"{name} {tuple(seq)} must have one entry per stage of depths {tuple(depths)}")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = projection
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # per stage, linear over blocks
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(n):
            self.layers.append(MalaStage(
                embed_dims[i], embed_dims[i + 1] if i < n - 1 else None, depths[i], num_heads[i], mlp_ratio,
                attn_layers[i], dpr[i], layer_scales[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"layers.{i}"))
        self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
        self.norm = nn.BatchNorm2d(projection)
        self.act = nn.SiLU()  # the official MemoryEfficientSwish
        self.head = ClassifierHead(projection, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        # as the official model: convs too
        self.apply(partial(init_linear_layernorm, linear_types=(nn.Conv2d, nn.Linear)))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.(?:RoPE|downsample)", (99998,)),
                (r"^(?:proj|norm)\.", (99999,)),
            ],
        )

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last from the start: oneDNN's stem convs run faster on it (inference ~2x, training
        # the same), and the stages keep that layout
        return self.patch_embed(x.contiguous(memory_format=torch.channels_last))

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(pointwise(self.proj, x)))

    def _final_features(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        # the neck (1x1 proj to num_features) only fits the last stage's map
        return self._neck(x) if complete else x

    def _prune_head(self) -> None:
        # the projection expects the last stage's channels
        self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        self.reset_classifier(0, "")


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official MAViT checkpoint (``{'model': sd}`` or raw) to ours: the 1x1-conv classifier
    ``head`` becomes ``head.fc``; every other key is already ours."""
    sd = unwrap_state_dict(state_dict)
    sd = {k: (v.flatten(1) if k == "head.weight" and v.dim() == 4 else v) for k, v in sd.items()}
    return remap_keys(sd, ((r"^head\.(weight|bias)$", r"head.fc.\1"),))


def _create_mala(variant, pretrained=False, **kwargs):
    return build_model(
        MAViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    # official eval (datasets.py): resize 256 bicubic, centre crop 224
    return cfg(**dict(dict(
        first_conv="patch_embed.proj.0", classifier="head.fc", interpolation="bicubic", license="unknown",
        paper_ids="arXiv:2507.00698", paper_name="Rectifying Magnitude Neglect in Linear Attention",
        origin_url="https://github.com/qhfan/MALA"), **kwargs))


# the README links only the Hugging Face repo's file listing, not the files
_NOTES = ("No direct link: the official README points to https://huggingface.co/aldjalkdf/MAViT/tree/main "
          "without file names. Download the file there, then convert it (tools/convert_checkpoint.py) or pass "
          "pretrained_cfg_overlay=dict(hf_hub_id='aldjalkdf/MAViT', hf_hub_filename=<file>).",)

default_cfgs = generate_default_cfgs({
    "mala_tiny.in1k": _cfg(notes=_NOTES),
    "mala_small.in1k": _cfg(notes=_NOTES),
    "mala_base.in1k": _cfg(notes=_NOTES),
    "mala_large.in1k": _cfg(notes=_NOTES),
    "test_mala.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def mala_tiny(pretrained=False, **kwargs) -> MAViT:
    """MAViT-T (official ``MALA_T``): 16.4M params, 2.6 GMACs."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)
    return _create_mala("mala_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def mala_small(pretrained=False, **kwargs) -> MAViT:
    """MAViT-S (official ``MALA_S``): 27.1M params, 4.9 GMACs, 84.7% top-1 (paper)."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                      drop_path_rate=0.15)
    return _create_mala("mala_small", pretrained, **dict(model_args, **kwargs))


@register_model
def mala_base(pretrained=False, **kwargs) -> MAViT:
    """MAViT-B (official ``MALA_B``): 49.8M params, 10.6 GMACs; layer scales 1e-6 in stages 3-4."""
    model_args = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                      layer_scales=(1.0, 1.0, 1e-6, 1e-6), drop_path_rate=0.4)
    return _create_mala("mala_base", pretrained, **dict(model_args, **kwargs))


@register_model
def mala_large(pretrained=False, **kwargs) -> MAViT:
    """MAViT-L (official ``MALA_L``): 97.8M params, 17.3 GMACs; layer scales 1e-6."""
    model_args = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                      layer_scales=(1e-6,) * 4, projection=2560, drop_path_rate=0.55)
    return _create_mala("mala_large", pretrained, **dict(model_args, **kwargs))


@register_model
def test_mala(pretrained=False, **kwargs) -> MAViT:
    """Tiny MAViT for tests: 16-channel heads, MALA in stages 1-3, softmax in stage 4."""
    model_args = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), mlp_ratio=2,
                      attn_layers=HYBRID[:2] + (MagnitudeAwareLinearAttention, RopeSoftmaxAttention),
                      layer_scales=(1.0, 0.5, 0.5, None), projection=96, drop_path_rate=0.1)
    return _create_mala("test_mala", pretrained, **dict(model_args, **kwargs))
