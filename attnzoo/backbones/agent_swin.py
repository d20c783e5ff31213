"""Agent-Swin: Swin Transformer with agent attention.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024.
Paper: https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention
(``agent_transformer/models/agent_swin.py``, ``cfgs/agent_swin_{t,s,b}.yaml``).

Each stage has a type letter (official ``ATTN_TYPE``): ``A`` = agent attention over the
whole feature map (the official window is 56, i.e. the map itself at 224 px), ``B`` =
Swin 7x7 window attention (odd blocks of a stage shifted by 3), ``M<n>`` = the first
``n`` blocks ``A``, the rest ``B``. T = ``AAAB``, S = ``AABB``, B = ``AAM2B``
(official string ``AAMB2``); agents per stage 9, 16, 49, 49 (``num_agents``, a model
argument: the official downstream code enlarges it).

``B`` blocks are timm's ``SwinTransformerBlock`` (padding + runtime shift mask, so any map
size works); ``A`` blocks use ``attnzoo.layers.AgentAttention``. Unlike the official model
(which asserts 224 x 224) any input >= 32 px runs: the patch embedding pads to a multiple
of 4, patch merging pads odd maps, and the agent biases are resized to the actual map.
Module tree: the official one, except that each stage's patch merging sits at the start
of the next stage (timm's Swin) and the classifier is ``head.fc``.

Official checkpoints (``{'model': sd}``, README of ``agent_transformer/``): Agent-Swin-T/S/B
at 224 px, Agent-Swin-S at 288 and Agent-Swin-B at 384 px; build the latter two with
``img_size=288`` / ``384`` (window of the ``B`` blocks 9 / 12, as the official rule gives;
49,707,964 / 88,305,016 params, equal to the official model's).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import calculate_drop_path_rates, ClassifierHead, DropPath, Mlp, PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._registry import register_model
from ..layers.agent import AgentAttention, resize_agent_param
from ._helpers import (
    ClassifierHeadMixin, StagedFeaturesMixin, cfg, init_linear_layernorm, remap_keys, unwrap_state_dict)
from ._pretrained import build_model

__all__ = ["AgentSwinTransformer"]


class AgentBlock(nn.Module):
    """Pre-norm block with agent attention over the whole ``[B, H, W, C]`` map: Agent-Swin's agent
    block (``sr_ratio=None``: one ``qkv`` projection) and Agent-PVT's official ``Block`` with
    ``attn_type='A'`` (an int ``sr_ratio``: ``q`` and ``kv`` projections)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_agents: int,
            feat_size: Tuple[int, int],
            sr_ratio: Optional[int] = None,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = AgentAttention(dim, num_heads, num_agents, bias_size=feat_size, qkv_bias=qkv_bias,
                                   sr_ratio=sr_ratio, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def block_types(stage_type: str, depth: int) -> List[str]:
    """``'A'``, ``'B'`` or ``'M<n>'`` (the first n blocks A) -> one letter per block."""
    if stage_type in ("A", "B"):
        return [stage_type] * depth
    if stage_type.startswith("M") and stage_type[1:].isdigit():
        n = int(stage_type[1:])
        return ["A" if i < n else "B" for i in range(depth)]
    raise ValueError(f"stage type must be 'A', 'B' or 'M<n>', got {stage_type!r}")


class AgentSwinStage(nn.Module):
    """Optional patch merging (official: the end of the previous stage), then the blocks."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            feat_size: Tuple[int, int],
            depth: int,
            num_heads: int,
            stage_type: str,
            num_agents: int,
            downsample: bool,
            window_size: Optional[int] = None,
            drop_path: Sequence[float] = (),
            norm_layer=nn.LayerNorm,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer) if downsample else nn.Identity()
        blocks = []
        for i, kind in enumerate(block_types(stage_type, depth)):
            common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                          drop_path=drop_path[i], norm_layer=norm_layer)
            if kind == "A":
                blocks.append(AgentBlock(out_dim, num_heads, num_agents, feat_size, **common))
            else:  # official: odd blocks of the stage shifted by window // 2
                blocks.append(SwinTransformerBlock(
                    out_dim, feat_size, num_heads, window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2, dynamic_mask=True, **common))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class AgentSwinTransformer(ClassifierHeadMixin, StagedFeaturesMixin, nn.Module):
    """Agent-Swin with the timm model contract.

    Channels-last inside; ``forward_features`` returns the normed ``[B, H, W, C]`` map,
    ``forward_intermediates`` one map per stage at reductions 4/8/16/32.

    Args:
        img_size: the training size; it sizes the agent row / column biases (official
            ``window_size`` = the 224 px map per stage) and the Swin windows' shift masks.
        depths, num_heads: blocks and heads per stage.
        embed_dim: channels of the first stage (doubled per stage).
        stage_types: per stage ``'A'``, ``'B'`` or ``'M<n>'`` (see the module docstring).
        num_agents: agent tokens per stage (official ``agent_num``).
        window_size: Swin window of the ``B`` blocks; None: the official rule
            ``max(7, map // 8)`` with ``map = img_size / 4`` (7 at 224 px, 9 at 288, 12 at 384).
        mlp_ratio, qkv_bias: as Swin.
        num_classes, in_chans, global_pool: as timm.
        drop_rate: dropout before the classifier (timm's meaning; the official model has none).
        proj_drop_rate: the official ``drop_rate`` (attention projections, MLPs, after the stem).
        attn_drop_rate: must be 0 in ``A`` blocks (fused op).
        drop_path_rate: stochastic depth, linear over all blocks.
    """
    stages_attr = "layers"

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            stage_types: Sequence[str] = ("A", "A", "A", "B"),
            num_agents: Sequence[int] = (9, 16, 49, 49),
            window_size: Optional[int] = None,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        n = len(depths)
        if not (len(num_heads) == len(stage_types) == len(num_agents) == n):
            raise ValueError(f"num_heads {num_heads}, stage_types {stage_types} and num_agents {num_agents} "
                             f"need one entry per stage of depths {depths}")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        img_size = to_2tuple(img_size)
        dims = [int(embed_dim * 2 ** i) for i in range(n)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"  # forward_features' layout, read by timm (as on its Swin)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        self.pos_drop = nn.Dropout(proj_drop_rate)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        window_size = window_size or max(7, grid[0] // 8)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # per stage, linear over blocks
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(n):
            feat_size = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            self.layers.append(AgentSwinStage(
                dims[max(i - 1, 0)], dims[i], feat_size, depths[i], num_heads[i], stage_types[i], int(num_agents[i]),
                downsample=i > 0, window_size=window_size, drop_path=dpr[i],
                norm_layer=norm_layer, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        # as the official model; convs keep PyTorch's default, the biases their trunc_normal(0.02)
        self.apply(init_linear_layernorm)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))


_AGENT_BIASES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")


def resize_agent_biases(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize agent biases whose shape differs from ``model``'s (another ``num_agents`` or
    ``img_size``); shared with Agent-PVT."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        name = k.rsplit(".", 1)[-1]
        if name in _AGENT_BIASES and k in own and own[k].shape != v.shape:
            v = resize_agent_param(name, v, tuple(own[k].shape))
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official Agent-Swin checkpoint (``{'model': sd}`` or raw) to ours: patch merging
    moves to the next stage, ``head`` -> ``head.fc``, the non-persistent buffers go; agent
    biases are resized when ``model`` has other ``num_agents`` / ``img_size``."""
    sd = unwrap_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    if "layers.0.downsample.reduction.weight" in sd:  # official layout (ours has no stage-0 merging)
        sd = {_shift_downsample(k): v for k, v in sd.items()}
    sd = remap_keys(sd, ((r"^head\.(weight|bias)$", r"head.fc.\1"),))
    return resize_agent_biases(sd, model) if model is not None else sd


def _shift_downsample(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) + 1)
    return ".".join(parts)


def _create_agent_swin(variant, pretrained=False, **kwargs):
    return build_model(
        AgentSwinTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, size_from_cfg=True,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    # official eval (data/build.py): Resize((s, s)) bicubic, centre crop = timm's "squash" mode;
    # crop 0.875 with TEST.CROP (default), 1.0 for the 288 / 384 px configs (TEST.CROP False)
    return cfg(**dict(dict(
        first_conv="patch_embed.proj", classifier="head.fc", interpolation="bicubic", crop_mode="squash",
        license="mit", paper_ids="arXiv:2312.08874",
        paper_name="Agent Attention: On the Integration of Softmax and Linear Attention",
        origin_url="https://github.com/LeapLabTHU/Agent-Attention"), **kwargs))


# Tsinghua Cloud direct links (?dl=1) of agent_transformer/README.md; Swin-style checkpoints
# {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'} (utils.save_checkpoint)
TSINGHUA_URL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"

default_cfgs = generate_default_cfgs({
    "agent_swin_tiny.in1k": _cfg(url=TSINGHUA_URL.format("a2ddc1190c224f768a41")),
    "agent_swin_small.in1k": _cfg(url=TSINGHUA_URL.format("f607172c9fea4d6e99bb")),
    "agent_swin_small.in1k_288": _cfg(url=TSINGHUA_URL.format("09760394e93b4046a25e"), input_size=(3, 288, 288),
                                      pool_size=(9, 9), crop_pct=1.0),
    "agent_swin_base.in1k": _cfg(url=TSINGHUA_URL.format("4fcd2d0114bb490483c3")),
    "agent_swin_base.in1k_384": _cfg(url=TSINGHUA_URL.format("bb84ee9058954706a557"), input_size=(3, 384, 384),
                                     pool_size=(12, 12), crop_pct=1.0),
    "test_agent_swin.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def agent_swin_tiny(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T: 28.9M params, 4.5 GMACs; stages AAAB."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), stage_types="AAAB",
                      drop_path_rate=0.2)
    return _create_agent_swin("agent_swin_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S: 49.7M params, 8.7 GMACs; stages AABB."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), stage_types="AABB",
                      drop_path_rate=0.3)
    return _create_agent_swin("agent_swin_small", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B: 88.1M params, 15.4 GMACs; stage 3 has 2 agent blocks, then Swin windows."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      stage_types=("A", "A", "M2", "B"), drop_path_rate=0.5)
    return _create_agent_swin("agent_swin_base", pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_swin(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Tiny Agent-Swin for tests at 64 px: every block kind (A, shifted and plain B, M1)."""
    model_args = dict(img_size=64, embed_dim=16, depths=(1, 1, 3, 2), num_heads=(1, 2, 2, 4),
                      stage_types=("A", "A", "M1", "B"), num_agents=(4, 6, 9, 4), window_size=2, mlp_ratio=2,
                      drop_path_rate=0.1)
    return _create_agent_swin("test_agent_swin", pretrained, **dict(model_args, **kwargs))
