"""CBAM ResNets.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
Paper: https://arxiv.org/abs/1807.06521 ; official code: https://github.com/Jongchan/attention-module

The gate sits after the last BN of every residual block, before the shortcut
add, exactly where timm's ResNet calls its ``attn_layer``; so the blocks, stages
and model are timm's ``ResNet`` and this file only adds the gate, the
official-checkpoint mapping and the registrations. Unlike the official model
(fixed ``AvgPool2d(7)``), any input size works.
"""
from functools import partial

from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .._registry import register_model
from ..layers.cbam import CbamGate
from ._helpers import cfg, remap_keys, unwrap_state_dict
from ._pretrained import build_model

__all__ = []

# official key -> ours: layerX.Y.cbam.ChannelGate.mlp.{1,3} / .SpatialGate.spatial.{conv,bn}
_OFFICIAL_KEYS = (
    (r"\.cbam\.ChannelGate\.mlp\.1\.", ".se.channel.fc1."),
    (r"\.cbam\.ChannelGate\.mlp\.3\.", ".se.channel.fc2."),
    (r"\.cbam\.SpatialGate\.spatial\.", ".se.spatial."),
)


def checkpoint_filter_fn(state_dict, model=None):
    """Map an official CBAM checkpoint (``{'state_dict': ...}``, ``module.`` prefix) to ours."""
    return remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_KEYS)


def _create_cbam_resnet(variant, block, layers, pretrained=False, **kwargs):
    model_args = dict(
        block=block, layers=layers, block_args=dict(attn_layer=CbamGate),
        zero_init_last=False,  # the official init leaves the last BN at one
    )
    return build_model(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(model_args, **kwargs))


def _cfg(**kwargs):
    # official eval (train_imagenet.py): Scale(256) bilinear, centre crop 224
    return cfg(
        first_conv="conv1", classifier="fc", license="mit", paper_ids="arXiv:1807.06521",
        paper_name="CBAM: Convolutional Block Attention Module",
        origin_url="https://github.com/Jongchan/attention-module", **kwargs)


default_cfgs = generate_default_cfgs({
    "cbam_resnet18.untrained": _cfg(),
    "cbam_resnet34.untrained": _cfg(),
    # the only released checkpoint (README: ResNet50+CBAM, 100 epochs, top-1 77.622), a Google Drive page
    "cbam_resnet50.in1k": _cfg(notes=(
        "No direct link: Google Drive share page https://drive.google.com/file/d/1mvAVvhLR_2XY_bPYxh-SEz4vDmGzSArO/"
        "view?usp=sharing (RESNET50_CBAM_new_name_wrap.pth). Download it, then convert it "
        "(tools/convert_checkpoint.py) or pass pretrained_cfg_overlay=dict(file=<it>).",)),
    "cbam_resnet101.untrained": _cfg(),
    "test_cbam_resnet.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def cbam_resnet18(pretrained=False, **kwargs) -> ResNet:
    return _create_cbam_resnet("cbam_resnet18", BasicBlock, (2, 2, 2, 2), pretrained, **kwargs)


@register_model
def cbam_resnet34(pretrained=False, **kwargs) -> ResNet:
    return _create_cbam_resnet("cbam_resnet34", BasicBlock, (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def cbam_resnet50(pretrained=False, **kwargs) -> ResNet:
    return _create_cbam_resnet("cbam_resnet50", Bottleneck, (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def cbam_resnet101(pretrained=False, **kwargs) -> ResNet:
    return _create_cbam_resnet("cbam_resnet101", Bottleneck, (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def test_cbam_resnet(pretrained=False, **kwargs) -> ResNet:
    """Tiny variant for tests: one block per stage, narrow."""
    kwargs = dict(dict(channels=(16, 32, 48, 64), stem_width=16, block_args=dict(attn_layer=partial(CbamGate, reduction=4))), **kwargs)
    return _create_cbam_resnet("test_cbam_resnet", BasicBlock, (1, 1, 1, 1), pretrained, **kwargs)
