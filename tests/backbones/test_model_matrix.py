"""Every tiny ``test_*`` model (found in the registry, so a new family is covered when it
registers one) through the situations training and deployment put it in: bf16 autocast
forward + backward, channels_last (forward equal to contiguous, and a training step), batch
consistency in eval mode, odd input sizes, and the ``forward_features`` layout that timm reads
from ``output_fmt``."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import get_channel_dim, get_spatial_dim

import attnzoo

MODELS = attnzoo.list_models("test_*")
NUM_CLASSES = 5


def _create(name, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def _input(model, batch=2, size=None, seed=0):
    size = size or model.pretrained_cfg["input_size"][1:]
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


def _train_step(model, x, autocast=False):
    """One SGD step on a cross-entropy loss; returns the loss. Every trainable parameter must
    receive a finite gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    target = torch.arange(x.shape[0]) % NUM_CLASSES
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        loss = F.cross_entropy(out.float(), target)
    assert torch.isfinite(out).all(), "non-finite output"
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    opt.step()
    assert torch.isfinite(loss), loss
    return loss


def test_matrix_is_not_empty():
    assert len(MODELS) >= 9 and all(timm.is_model(n) for n in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_forward_backward(name):
    model = _create(name).train()
    x = _input(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the classifier runs in bf16: autocast reached it
    _train_step(model, x, autocast=True)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last(name):
    """``model.to(memory_format=torch.channels_last)`` (timm's and tools/train.py's
    --channels-last) keeps the state dict as it was, gives the contiguous model's output, and trains."""
    model = _create(name).eval()
    x = _input(model)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x)
    assert _rel_err(got, want) < 1e-4, _rel_err(got, want)
    model.train()
    loss = _train_step(model, x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", MODELS)
def test_batch_consistency(name):
    """In eval mode a sample's output does not depend on the rest of the batch."""
    model = _create(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        one, two = model(x[:1]), model(x)
    assert _rel_err(two[:1], one) < 1e-4, _rel_err(two[:1], one)


@pytest.mark.parametrize("name", MODELS)
def test_odd_input_size(name):
    """61 x 77: neither side a multiple of any stride."""
    model = _create(name).eval()
    x = _input(model, batch=1, size=(61, 77))
    with torch.no_grad():
        out = model(x)
        _, feats = model.forward_intermediates(x)
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()
    for f, info in zip(feats, model.feature_info):
        r = info["reduction"]
        assert f.shape[1:] == (info["num_chs"], -(-61 // r), -(-77 // r)), (f.shape, info)


@pytest.mark.parametrize("name", MODELS)
def test_forward_features_layout(name):
    """``forward_features`` is laid out as ``output_fmt`` says (timm's default NCHW when absent),
    with ``num_features`` channels and the cfg's ``pool_size``; the head and the unpooled model
    read that layout (the checks of timm's test_model_default_cfgs)."""
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    fmt = getattr(model, "output_fmt", "NCHW")
    x = _input(model)
    with torch.no_grad():
        feat = model.forward_features(x)
        pre = model.forward_head(feat, pre_logits=True)
    assert feat.dim() == 4
    assert feat.shape[get_channel_dim(fmt)] == model.num_features, (fmt, feat.shape, model.num_features)
    assert tuple(feat.shape[d] for d in get_spatial_dim(fmt)) == tuple(cfg["pool_size"]), (fmt, feat.shape)
    assert pre.shape == (2, model.head_hidden_size)
    model.reset_classifier(0, "")
    with torch.no_grad():
        unpooled = model(x)
    assert unpooled.shape == feat.shape  # no pooling, no classifier: forward_features' layout
    # the intermediates keep their own (NCHW) default, whatever the final layout
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
