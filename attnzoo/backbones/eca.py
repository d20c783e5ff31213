"""ECA ResNets and ECA-MobileNetV2.

Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
Networks", CVPR 2020. Paper: https://arxiv.org/abs/1910.03151 ;
official code: https://github.com/BangguWu/ECANet

Kernel sizes follow the released checkpoints (``eca_resnet50_k3557`` etc.), not
the paper's formula nor the code's default of 3 everywhere (ECANet issues #46,
#31). ResNets reuse timm's ``ResNet``: the gate sits after the last BN of each
block, where timm calls ``attn_layer``. MobileNetV2 keeps the official module
tree (the gate is the last layer of each block's ``conv`` sequence) so its
checkpoints load by name.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .._registry import register_model
from ..layers.eca import EcaGate
from ._helpers import ClassifierHeadMixin, cfg, remap_keys, unwrap_state_dict
from ._pretrained import build_model

__all__ = ["EcaMobileNetV2"]


class _StageEca:
    """``attn_layer`` for timm's ResNet: each stage has its own channel count, so
    the released per-stage kernel size is looked up by channels."""

    def __init__(self, kernel_by_channels: Dict[int, int]):
        self.kernel_by_channels = kernel_by_channels

    def __call__(self, channels: int, **kwargs) -> EcaGate:
        return EcaGate(channels, self.kernel_by_channels[channels], **kwargs)


def _resnet_eca(block, channels: Sequence[int], kernel_sizes: Sequence[int]) -> _StageEca:
    return _StageEca({c * block.expansion: k for c, k in zip(channels, kernel_sizes)})


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block with the ECA gate after the linear projection's BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, k_size: int):
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvBNReLU(in_chs, hidden, kernel_size=1))
        layers += [
            _ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            EcaGate(out_chs, k_size),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class EcaMobileNetV2(ClassifierHeadMixin, nn.Module):
    """ECA-MobileNetV2 with the timm model contract.

    Args:
        num_classes: classifier classes (0 for none).
        in_chans: input channels.
        width_mult: channel multiplier.
        drop_rate: dropout before the classifier (0.25 in the official model).
        global_pool: timm pool type.
        eca_kernel: kernel size of the gates on blocks of < 96 / >= 96 output channels
            (1 / 3 in the released ``eca_mobilenetv2_k13``).
    """

    # t, c, n, s
    arch = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            width_mult: float = 1.0,
            drop_rate: float = 0.25,
            global_pool: str = "avg",
            eca_kernel: Tuple[int, int] = (1, 3),
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        in_chs = int(32 * width_mult)
        self.num_features = self.head_hidden_size = int(1280 * max(1.0, width_mult))
        features: List[nn.Module] = [_ConvBNReLU(in_chans, in_chs, stride=2)]
        self.feature_info = []
        reduction = 2
        for t, c, n, s in self.arch:
            out_chs = int(c * width_mult)
            if s == 2:  # the previous block ends a resolution
                self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"features.{len(features) - 1}"))
                reduction *= 2
            for i in range(n):
                k = eca_kernel[0] if c < 96 else eca_kernel[1]
                features.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, k))
                in_chs = out_chs
        features.append(_ConvBNReLU(in_chs, self.num_features, kernel_size=1))
        self.feature_info.append(dict(num_chs=self.num_features, reduction=reduction, module=f"features.{len(features) - 1}"))
        self.features = nn.Sequential(*features)
        self._stage_ends = [int(f["module"].split(".")[1]) for f in self.feature_info]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # as the official model (torchvision's MobileNetV2 init)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features at the end of each resolution (``feature_info`` order) and, unless
        ``intermediates_only``, the final features."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._stage_ends), indices)
        take_blocks = {self._stage_ends[i] for i in take_indices}
        last = self._stage_ends[max_index] if stop_early or intermediates_only else len(self.features) - 1
        intermediates = []
        for i, block in enumerate(self.features[:last + 1]):
            x = block(x)
            if i in take_blocks:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self._stage_ends), indices)
        self.features = self.features[:self._stage_ends[max_index] + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)



# official ResNet keys: layerX.Y.eca.conv.weight -> timm's attn slot `se`;
# official MobileNetV2 keys are ours but the classifier: classifier.1 -> head.fc
_OFFICIAL_KEYS = (
    (r"\.eca\.conv\.", ".se.conv."),
    (r"^classifier\.1\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official ECA checkpoint (``{'state_dict': ...}``, ``module.`` prefix) to ours."""
    return remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_KEYS)


def _create_eca_resnet(variant, block, layers, kernel_sizes, pretrained=False, **kwargs):
    channels = kwargs.get("channels", (64, 128, 256, 512))
    model_args = dict(block=block, layers=layers, block_args=dict(attn_layer=_resnet_eca(block, channels, kernel_sizes)),
                      zero_init_last=False)  # the official init leaves the last BN at one
    return build_model(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(model_args, **kwargs))


def _create_eca_mobilenet_v2(variant, pretrained=False, **kwargs):
    return build_model(
        EcaMobileNetV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3, 4)), **kwargs)


def _cfg(**kwargs):
    # official eval (main.py): Resize(256) bilinear, centre crop 224
    return cfg(**dict(dict(
        first_conv="conv1", classifier="fc", license="mit", paper_ids="arXiv:1910.03151",
        paper_name="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
        origin_url="https://github.com/BangguWu/ECANet"), **kwargs))


def _released(file: str, drive_id: str, baidu: str, code: str):
    # the README's BaiduDrive (with extract code) and Google Drive share pages: no direct link
    return (f"No direct link: {file} is on Google Drive https://drive.google.com/open?id={drive_id} and "
            f"BaiduDrive {baidu} (extract code {code}). Download it, then convert it (tools/convert_checkpoint.py) "
            f"or pass pretrained_cfg_overlay=dict(file=<it>).",)


default_cfgs = generate_default_cfgs({
    "eca_resnet18.in1k": _cfg(notes=_released(
        "eca_resnet18_k3577", "1LMRFRTyzVifGBi2MUpTuYEWW44S8mwyl", "https://pan.baidu.com/s/1Bh9J7VY2tYj5oEvEEqvdhQ",
        "utsy")),
    "eca_resnet34.in1k": _cfg(notes=_released(
        "eca_resnet34_k3357", "15LV5Jkea3GPzvLP5__H7Gg88oNQUxBDE", "https://pan.baidu.com/s/1FFVUBbbJfNNFhyiZZ2P2AQ",
        "o4dh")),
    "eca_resnet50.in1k": _cfg(notes=_released(
        "eca_resnet50_k3557", "1670rce333c_lyMWFzBlNZoVUvtxbCF_U", "https://pan.baidu.com/s/18LXDcxy8qG66h-7FlWW4SA",
        "no6u")),
    "eca_resnet101.in1k": _cfg(notes=_released(
        "eca_resnet101_k3357", "1b5FQ8yDFnZ_UhvWT9txmjI_LjbKkgnvC", "https://pan.baidu.com/s/1-ageRP2tku-YSIOqU09WpA",
        "iov1")),
    "eca_resnet152.in1k": _cfg(notes=_released(
        "eca_resnet152_k3357", "1_bYnaOg9ptsILC_iC7uQ5Izv-u2rjYG5", "https://pan.baidu.com/s/1tPxHAltlcpI93CXUkW9ZOQ",
        "xaft")),
    "eca_mobilenet_v2.in1k": _cfg(first_conv="features.0.0", classifier="head.fc", notes=_released(
        "eca_mobilenetv2_k13", "1FxzeXPg1SJQZzVVH4HRjMeq_SVMfidUm", "https://pan.baidu.com/s/143B03YTGE2ogkPoCj3IorQ",
        "atpt")),
    "test_eca_resnet.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def eca_resnet18(pretrained=False, **kwargs) -> ResNet:
    return _create_eca_resnet("eca_resnet18", BasicBlock, (2, 2, 2, 2), (3, 5, 7, 7), pretrained, **kwargs)


@register_model
def eca_resnet34(pretrained=False, **kwargs) -> ResNet:
    return _create_eca_resnet("eca_resnet34", BasicBlock, (3, 4, 6, 3), (3, 3, 5, 7), pretrained, **kwargs)


@register_model
def eca_resnet50(pretrained=False, **kwargs) -> ResNet:
    return _create_eca_resnet("eca_resnet50", Bottleneck, (3, 4, 6, 3), (3, 5, 5, 7), pretrained, **kwargs)


@register_model
def eca_resnet101(pretrained=False, **kwargs) -> ResNet:
    return _create_eca_resnet("eca_resnet101", Bottleneck, (3, 4, 23, 3), (3, 3, 5, 7), pretrained, **kwargs)


@register_model
def eca_resnet152(pretrained=False, **kwargs) -> ResNet:
    return _create_eca_resnet("eca_resnet152", Bottleneck, (3, 8, 36, 3), (3, 3, 5, 7), pretrained, **kwargs)


@register_model
def eca_mobilenet_v2(pretrained=False, **kwargs) -> EcaMobileNetV2:
    return _create_eca_mobilenet_v2("eca_mobilenet_v2", pretrained, **kwargs)


@register_model
def test_eca_resnet(pretrained=False, **kwargs) -> ResNet:
    """Tiny variant for tests: one block per stage, narrow."""
    kwargs = dict(dict(channels=(16, 32, 48, 64), stem_width=16), **kwargs)
    return _create_eca_resnet("test_eca_resnet", BasicBlock, (1, 1, 1, 1), (3, 3, 5, 5), pretrained, **kwargs)
