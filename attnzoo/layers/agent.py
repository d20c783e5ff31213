"""Agent attention module (Han et al., ECCV 2024, https://arxiv.org/abs/2312.08874).

One layer for both official families: Agent-Swin (fused ``qkv`` projection, keys
on the full map) and Agent-PVT (``q`` and ``kv`` projections, keys optionally after
PVT's spatial-reduction conv ``sr`` + ``norm``). Parameter names are the official
ones (``qkv`` | ``q``/``kv``/``sr``/``norm``, ``proj``, ``dwc``, ``an_bias``,
``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``) and the state dict
has the official shapes, so released checkpoints load by name. The four row / column
biases are 4-D parameters (the official 5-D shape without its leading 1), so the
module can be moved to ``channels_last``.

Unlike the official code the layer takes any map size and any number of agents:
the official row / column biases are sized for the 224 px map and the agents
pooled to a square grid, which breaks off that size (Agent-Attention issues #20,
#39). Here the ``[heads, A, 7, 7]`` tables are resized to the actual map (as the
official code does), the row / column biases are linearly resized when the map
differs from ``bias_size`` (identity at the trained size), and the agents are
pooled to a ``(ph, pw)`` grid with ``ph * pw == num_agents`` (``agent_grid``).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

from ..ops.agent import agent_attention

__all__ = ["AgentAttention", "agent_grid", "resize_agent_param"]


def agent_grid(num_agents: int) -> Tuple[int, int]:
    """The pooled grid of ``num_agents`` agents: the most square ``ph x pw`` with ``ph <= pw``."""
    ph = int(math.isqrt(num_agents))
    while num_agents % ph:
        ph -= 1
    return ph, num_agents // ph


def _resize_axis(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Linear (align_corners=False) resize of one axis; identity when it already has ``size``."""
    if t.shape[dim] == size:
        return t
    x = t.movedim(dim, -1)
    lead = x.shape[:-1]
    x = F.interpolate(x.reshape(1, -1, x.shape[-1]), size=size, mode="linear", align_corners=False)
    return x.reshape(*lead, size).movedim(-1, dim)


def resize_agent_param(name: str, value: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Resize an official agent bias to ``shape``: the agent axis as its ``agent_grid``
    (bilinear), the map axes linearly. Used to load a checkpoint into a model with
    other ``num_agents`` or another ``img_size`` (Agent-Attention issue #20)."""
    agent_dim = {"an_bias": 1, "na_bias": 1, "ah_bias": 2, "aw_bias": 2, "ha_bias": 4, "wa_bias": 4}[name]
    if value.shape[agent_dim] != shape[agent_dim]:
        (gh, gw), (th, tw) = agent_grid(value.shape[agent_dim]), agent_grid(shape[agent_dim])
        x = value.movedim(agent_dim, -1)
        lead = x.shape[:-1]
        x = F.interpolate(x.reshape(-1, 1, gh, gw), size=(th, tw), mode="bilinear", align_corners=False)
        value = x.reshape(*lead, th * tw).movedim(-1, agent_dim)
    for d in range(value.dim()):
        if d != agent_dim and value.shape[d] != shape[d]:
            value = _resize_axis(value, d, shape[d])
    return value.contiguous()


# The row / column biases are 5-D in the official model and its checkpoints ([1, heads, ...],
# the 1 broadcasting over the batch). ``Module.to(memory_format=torch.channels_last)`` converts
# every 4-D and 5-D tensor and refuses channels_last for a 5-D one, so the parameters drop the
# leading 1; the state dict restores it (and loading removes it), so checkpoints keep the
# official keys and shapes.
_ROW_COL_BIASES = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")


def _row_col_biases_to_official(module, state_dict, prefix, local_metadata):
    for name in _ROW_COL_BIASES:
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name].unsqueeze(0)


def _row_col_biases_from_official(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
    for name in _ROW_COL_BIASES:
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[0] == 1:
            state_dict[prefix + name] = t.squeeze(0)


class AgentAttention(nn.Module):
    """Multi-head agent attention over a channels-last map ``[B, H, W, C]``.

    ``A = num_agents`` agent tokens are the queries average-pooled to ``agent_grid(A)``.
    The agents attend the keys (bias ``B1`` from ``an_bias`` resized to the key map plus
    ``ah_bias + aw_bias``), the queries attend the agents (bias ``B2`` from ``na_bias``
    resized to the query map plus ``ha_bias + wa_bias``), and a 3x3 depthwise conv of
    the values (resized bilinearly to the query map after a spatial reduction) is added
    before the output projection.

    Args:
        dim: channels (``num_heads * head_dim``).
        num_heads: attention heads.
        num_agents: agent tokens (official ``agent_num``); any count >= 1.
        bias_size: the query map the row / column biases are learned for (the 224 px
            feature map, official ``window_size``); other maps resize them.
        qkv_bias: bias of the q / k / v projections.
        sr_ratio: None: Agent-Swin layout, one ``qkv`` projection. An int: Agent-PVT
            layout, ``q`` and ``kv`` projections, and for ``sr_ratio > 1`` the keys and
            values come from PVT's strided ``sr`` conv + ``norm`` (LayerNorm).
        attn_drop: must be 0 (the op is fused; every official config uses 0).
        proj_drop: dropout after ``proj``.
        backend: forwarded to ``agent_attention``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_agents: int = 49,
            bias_size: Union[int, Tuple[int, int]] = 7,
            qkv_bias: bool = True,
            sr_ratio: Optional[int] = None,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            backend: Optional[str] = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentAttention: dim {dim} is not divisible by num_heads {num_heads}")
        if num_agents < 1:
            raise ValueError(f"AgentAttention: num_agents must be >= 1, got {num_agents}")
        if sr_ratio is not None and sr_ratio < 1:
            raise ValueError(f"AgentAttention: sr_ratio must be None or >= 1, got {sr_ratio}")
        if attn_drop:
            raise ValueError("AgentAttention: attn_drop is not supported (the op is fused; official configs use 0)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_agents = num_agents
        self.agent_grid = agent_grid(num_agents)
        self.bias_size = to_2tuple(bias_size)
        self.sr_ratio = sr_ratio
        self.backend = backend
        if sr_ratio is None:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
                self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

        h, w = self.bias_size
        s = sr_ratio or 1
        self.an_bias = nn.Parameter(torch.zeros(num_heads, num_agents, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, num_agents, 7, 7))
        # the official [1, heads, ...] row / column biases without their leading 1 (see _ROW_COL_BIASES)
        self.ah_bias = nn.Parameter(torch.zeros(num_heads, num_agents, h // s, 1))
        self.aw_bias = nn.Parameter(torch.zeros(num_heads, num_agents, 1, w // s))
        self.ha_bias = nn.Parameter(torch.zeros(num_heads, h, 1, num_agents))
        self.wa_bias = nn.Parameter(torch.zeros(num_heads, 1, w, num_agents))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p, std=0.02)
        self.register_state_dict_post_hook(_row_col_biases_to_official)
        self.register_load_state_dict_pre_hook(_row_col_biases_from_official)

    def biases(self, size: Tuple[int, int], kv_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``B1`` ``[heads, A, Hk * Wk]`` and ``B2`` ``[heads, H * W, A]`` for a query map ``size``
        and a key map ``kv_size``."""
        heads, agents = self.num_heads, self.num_agents
        b1 = F.interpolate(self.an_bias, size=kv_size, mode="bilinear", align_corners=False)
        b1 = b1 + _resize_axis(self.ah_bias, 2, kv_size[0]) + _resize_axis(self.aw_bias, 3, kv_size[1])
        b2 = F.interpolate(self.na_bias, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        b2 = b2 + _resize_axis(self.ha_bias, 1, size[0]) + _resize_axis(self.wa_bias, 2, size[1])
        return b1.reshape(heads, agents, -1), b2.reshape(heads, -1, agents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        heads, hd = self.num_heads, self.head_dim
        if self.sr_ratio is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            kv_size = (H, W)
        else:
            q = self.q(x)
            x_kv = x
            if self.sr_ratio > 1:
                x_kv = x.permute(0, 3, 1, 2)
                if H < self.sr_ratio or W < self.sr_ratio:  # tiny inputs: one reduced token per axis
                    x_kv = F.pad(x_kv, (0, max(self.sr_ratio - W, 0), 0, max(self.sr_ratio - H, 0)))
                x_kv = self.norm(self.sr(x_kv).permute(0, 2, 3, 1))
            kv_size = (x_kv.shape[1], x_kv.shape[2])
            k, v = self.kv(x_kv).chunk(2, dim=-1)
        agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), self.agent_grid)  # [B, C, ph, pw]
        agents = agents.reshape(B, heads, hd, -1).transpose(-2, -1)  # [B, heads, A, hd]

        def split(t):  # [B, h, w, C] -> [B, heads, h * w, hd]
            return t.reshape(B, -1, heads, hd).transpose(1, 2)

        b1, b2 = self.biases((H, W), kv_size)  # under autocast the op casts them with q
        out = agent_attention(split(q), split(k), split(v), agents, b1, b2,
                              scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        v = v.permute(0, 3, 1, 2)
        if kv_size != (H, W):
            v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
        out = out + self.dwc(v).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))
