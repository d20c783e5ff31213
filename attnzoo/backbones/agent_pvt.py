"""Agent-PVT: Pyramid Vision Transformer with agent attention.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024.
Paper: https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_pvt.py``, ``cfgs/agent_pvt_{t,s,m,b}.yaml``).

PVT v1 (four stages of strided patch embedding + learned position embedding + blocks)
whose every block uses agent attention (official ``ATTN_TYPE: AAAA``) with 9, 16, 49, 49
agents. The released models use the agent attention's spatial-reduction ratio 1 per stage
(``PVT_LA_SR_RATIOS: 1111``), i.e. keys and values on the full map; ``sr_ratios`` (a model
argument) puts them after PVT's strided ``sr`` conv instead, in the same layer. There is
no final norm: the official head averages the last stage's tokens.

Unlike the official model (whose position embeddings fail off 224 px: it compares the
stage's token count with stage 1's) any input >= 32 px runs: position embeddings and
agent biases are resized to the actual maps. Module tree: ``patch_embed{i}`` /
``pos_embed{i}`` / ``block{i}`` become ``stages.{i-1}.{patch_embed, pos_embed, blocks}``
and ``head`` -> ``head.fc``.

Official checkpoints (``{'model': sd}``, README of ``agent_transformer/``): Agent-PVT-T/S/M/L
at 224 px and Agent-PVT-M at 256 px (build it with ``img_size=256``: 36,083,682 params, equal
to the official model's).
"""
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, ClassifierHead, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._registry import register_model
from ._helpers import (
    ClassifierHeadMixin, StagedFeaturesMixin, cfg, init_linear_layernorm, remap_keys, unwrap_state_dict)
from ._pretrained import build_model
from .agent_swin import TSINGHUA_URL, AgentBlock, resize_agent_biases

__all__ = ["AgentPyramidVisionTransformer"]


class PatchEmbed(nn.Module):
    """Strided conv (kernel = stride = patch size) + LayerNorm; NCHW in, NHWC out. Maps that
    are not a multiple of the patch are zero-padded bottom / right first (mmdet's adaptive
    "corner" padding), so every level is ``ceil(size / stride)`` like the other families;
    the official model floors, which only differs off multiples of 32."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AgentPvtStage(nn.Module):
    """Patch embedding, position embedding (learned at ``feat_size``, resized bilinearly to
    other maps as the official ``_get_pos_embed``), then the blocks."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            patch_size: int,
            feat_size: Tuple[int, int],
            depth: int,
            num_heads: int,
            num_agents: int,
            sr_ratio: int = 1,
            drop_path: Sequence[float] = (),
            proj_drop: float = 0.0,
            **block_kwargs,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.grad_checkpointing = False
        self.feat_size = feat_size
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, feat_size[0] * feat_size[1], dim))  # official layout
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.Sequential(*[
            AgentBlock(dim, num_heads, num_agents, feat_size, sr_ratio=sr_ratio, drop_path=drop_path[i],
                          proj_drop=proj_drop, **block_kwargs)
            for i in range(depth)])

    def _pos_embed(self, size: Tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed.reshape(1, *self.feat_size, -1)
        if tuple(size) != tuple(self.feat_size):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(x + self._pos_embed(x.shape[1:3]))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class AgentPyramidVisionTransformer(ClassifierHeadMixin, StagedFeaturesMixin, nn.Module):
    """Agent-PVT with the timm model contract.

    Channels-last inside; every stage takes NCHW (its patch embedding is a conv) and
    returns NHWC. ``forward_features`` returns the last stage's ``[B, H, W, C]`` map (the
    official model has no final norm), ``forward_intermediates`` one map per stage at
    reductions 4/8/16/32.

    Args:
        img_size: the training size; it sizes the position embeddings and the agent
            row / column biases (other sizes resize them).
        patch_size: first stage's patch size (the others merge 2 x 2).
        embed_dims, depths, num_heads, mlp_ratios: per stage.
        num_agents: agent tokens per stage (official ``agent_num``).
        sr_ratios: spatial reduction of the agent attention's keys / values per stage
            (official ``agent_sr_ratios``, 1 in every released model).
        qkv_bias: bias of the q / kv projections.
        num_classes, in_chans, global_pool: as timm.
        drop_rate: dropout before the classifier (timm's meaning; the official model has none).
        proj_drop_rate: the official ``drop_rate`` (position embeddings, attention projections, MLPs).
        attn_drop_rate: must be 0 (fused op).
        drop_path_rate: stochastic depth, linear over all blocks.
    """
    final_norm = False  # ``norm=`` / ``prune_norm`` are accepted for the timm contract and do nothing

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            num_agents: Sequence[int] = (9, 16, 49, 49),
            sr_ratios: Sequence[int] = (1, 1, 1, 1),
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        n = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(num_agents) == len(sr_ratios) == n):
            raise ValueError(f"embed_dims, num_heads, mlp_ratios, num_agents and sr_ratios need one entry per "
                             f"stage of depths {depths}")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        img_size = to_2tuple(img_size)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = "NHWC"  # forward_features' layout, read by timm (as on its Swin)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # per stage, linear over blocks
        self.stages = nn.ModuleList()
        self.feature_info = []
        reduction = patch_size
        for i in range(n):
            if i > 0:
                reduction *= 2
            feat_size = (img_size[0] // reduction, img_size[1] // reduction)
            self.stages.append(AgentPvtStage(
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], patch_size if i == 0 else 2, feat_size,
                depths[i], num_heads[i], int(num_agents[i]), sr_ratio=int(sr_ratios[i]),
                drop_path=dpr[i], proj_drop=proj_drop_rate,
                mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, attn_drop=attn_drop_rate, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        self.apply(init_linear_layernorm)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()  # the official model decays its position embeddings too

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^stages\.0\.(?:patch_embed|pos_embed)",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    def _stage_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x if i == 0 else x.permute(0, 3, 1, 2)  # each stage's patch embedding is a conv


_OFFICIAL_KEYS = (
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed."),
    (r"^pos_embed(\d)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed"),
    (r"^block(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official Agent-PVT checkpoint (``{'model': sd}`` or raw) to ours; position
    embeddings and agent biases are resized when ``model`` has another ``img_size`` /
    ``num_agents``."""
    sd = remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_KEYS)
    if model is None:
        return sd
    own = model.state_dict()
    for k, v in list(sd.items()):
        if k.endswith("pos_embed") and k in own and own[k].shape != v.shape:
            stage = model.get_submodule(k.rsplit(".", 1)[0])
            side = int(round(v.shape[1] ** 0.5))  # official embeddings are square
            grid = v.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=stage.feat_size, mode="bilinear", align_corners=False)
            sd[k] = grid.permute(0, 2, 3, 1).reshape(1, -1, v.shape[-1])
    return resize_agent_biases(sd, model)


def _create_agent_pvt(variant, pretrained=False, **kwargs):
    return build_model(
        AgentPyramidVisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        size_from_cfg=True, feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    # official eval (Agent-Swin's data/build.py): Resize((s, s)) bicubic, centre crop 0.875 = timm's "squash"
    return cfg(**dict(dict(
        first_conv="stages.0.patch_embed.proj", classifier="head.fc", interpolation="bicubic", crop_mode="squash",
        license="mit", paper_ids="arXiv:2312.08874",
        paper_name="Agent Attention: On the Integration of Softmax and Linear Attention",
        origin_url="https://github.com/LeapLabTHU/Agent-Attention"), **kwargs))


default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny.in1k": _cfg(url=TSINGHUA_URL.format("13fdf0e0a7c5498c934f")),
    "agent_pvt_small.in1k": _cfg(url=TSINGHUA_URL.format("36b8be9a8863456685a3")),
    "agent_pvt_medium.in1k": _cfg(url=TSINGHUA_URL.format("4d00ecacf18b45f9b88c")),
    "agent_pvt_medium.in1k_256": _cfg(url=TSINGHUA_URL.format("654df734121643b19c52"), input_size=(3, 256, 256),
                                      pool_size=(8, 8)),
    "agent_pvt_large.in1k": _cfg(url=TSINGHUA_URL.format("040cfe0cfbbe4762ad09")),  # config agent_pvt_b.yaml
    "test_agent_pvt.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})

# official: LayerNorm(eps=1e-6) in the blocks, mlp ratios 8, 8, 4, 4, heads 1, 2, 5, 8
_COMMON = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))


def _ln6(dim):
    return nn.LayerNorm(dim, eps=1e-6)


@register_model
def agent_pvt_tiny(pretrained=False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T: 11.6M params, 2.0 GMACs."""
    model_args = dict(_COMMON, depths=(2, 2, 2, 2), norm_layer=_ln6, drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained=False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S: 20.6M params, 4.0 GMACs."""
    model_args = dict(_COMMON, depths=(3, 4, 6, 3), norm_layer=_ln6, drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_small", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained=False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M: 35.9M params, 7.0 GMACs."""
    model_args = dict(_COMMON, depths=(3, 4, 18, 3), norm_layer=_ln6, drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_medium", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained=False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L: 48.7M params, 10.4 GMACs."""
    model_args = dict(_COMMON, depths=(3, 8, 27, 3), norm_layer=_ln6, drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_large", pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_pvt(pretrained=False, **kwargs) -> AgentPyramidVisionTransformer:
    """Tiny Agent-PVT for tests at 64 px, with spatial reduction 2 in the first stages."""
    model_args = dict(img_size=64, embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                      mlp_ratios=(2, 2, 2, 2), num_agents=(4, 6, 9, 4), sr_ratios=(2, 2, 1, 1), norm_layer=_ln6,
                      drop_path_rate=0.1)
    return _create_agent_pvt("test_agent_pvt", pretrained, **dict(model_args, **kwargs))
