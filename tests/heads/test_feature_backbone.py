"""AttnZooBackbone: stage channels, frozen stages, norm_eval, checkpoints, model kwargs (no OpenMMLab needed)."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import attnzoo
from attnzoo.backbones._helpers import CheckpointError
from attnzoo.heads import AttnZooBackbone, feature_channels, stage_info

TINY = attnzoo.list_models("test_*")  # one or more per family; new families join automatically


def _perturbed_state(name):
    model = timm.create_model(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var")
                        else v + 0.05 * torch.randn(v.shape, generator=g))
    return model


@pytest.mark.parametrize("name", TINY)
def test_out_channels_and_strides_follow_feature_info(name):
    stages = stage_info(name)
    assert [s["reduction"] for s in stages] == [4, 8, 16, 32]
    backbone = AttnZooBackbone(name, out_indices=(1, 2, 3)).eval()
    feats = backbone(torch.randn(2, 3, 96, 80))
    assert backbone.out_channels == [f.shape[1] for f in feats] == feature_channels(name, (1, 2, 3))
    assert backbone.strides == [8, 16, 32]
    assert [tuple(f.shape[-2:]) for f in feats] == [(-(-96 // s), -(-80 // s)) for s in (8, 16, 32)]


@pytest.mark.parametrize("name", TINY)
def test_frozen_stages_stay_frozen_and_in_eval_through_train(name):
    free = AttnZooBackbone(name, frozen_stages=-1)
    assert all(p.requires_grad for p in free.parameters())
    counts = []
    for k in range(0, 5):
        backbone = AttnZooBackbone(name, frozen_stages=k)
        backbone.train()
        frozen = [n for n, p in backbone.body.named_parameters() if not p.requires_grad]
        counts.append(len(frozen))
        # a model whose stage 0 starts at the input (PVT: its patch embedding is stage 0's) has no stem
        first = next(backbone.body.named_parameters())[0].removeprefix("model.")
        has_stem = k > 0 or not first.startswith(backbone.body.feature_info.module_name()[0] + ".")
        assert backbone.frozen_modules or not has_stem, f"{name}: frozen_stages={k} froze no module"
        assert all(not m.training for m in backbone.frozen_modules)
        assert backbone.training
        # the trainable rest is still in training mode and gets gradients; the frozen part gets none
        out = backbone(torch.randn(2, 3, 64, 64))[-1]
        if k < 4:
            out.sum().backward()
        else:  # everything frozen
            assert not out.requires_grad
        for n, p in backbone.body.named_parameters():
            assert (p.grad is None) == (not p.requires_grad), n
        trainable = [m for m in backbone.modules() if m not in backbone.frozen_modules
                     and any(True for _ in m.parameters(recurse=False))]
        assert all(m.training for m in trainable)
    total = sum(1 for _ in AttnZooBackbone(name).parameters())
    assert counts[1:] == sorted(set(counts[1:])) and counts[0] < counts[1] and counts[-1] == total, counts


def test_frozen_stem_matches_mmdet_resnet_convention():
    # mmdet ResNet: frozen_stages=1 freezes conv1/bn1 and layer1, nothing of layer2
    backbone = AttnZooBackbone("test_cbam_resnet", frozen_stages=1)
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}


def test_frozen_stages_survive_syncbn_conversion():
    backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(AttnZooBackbone("test_cbam_resnet", frozen_stages=2))
    backbone.train()
    syncbns = [m for m in backbone.frozen_modules if isinstance(m, torch.nn.SyncBatchNorm)]
    assert syncbns and all(not m.training and not m.weight.requires_grad for m in syncbns)


@pytest.mark.parametrize("name", ["test_cbam_resnet", "test_attn_halonet"])
def test_norm_eval_keeps_batchnorm_statistics(name):
    backbone = AttnZooBackbone(name, norm_eval=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert all(m.training for m in AttnZooBackbone(name).train().modules() if isinstance(m, torch.nn.BatchNorm2d))


def _reference_features(model, x):
    stages = [s["index"] for s in stage_info(model.pretrained_cfg["architecture"])]
    return model.eval().forward_intermediates(x, indices=stages, intermediates_only=True)


def test_checkpoint_in_attnzoo_layout_loads(tmp_path):
    model = _perturbed_state("test_nat")
    path = tmp_path / "test_nat.safetensors"
    save_file(model.state_dict(), str(path))
    backbone = AttnZooBackbone("test_nat", checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 96)
    for got, want in zip(backbone(x), _reference_features(model, x)):
        torch.testing.assert_close(got, want)


def test_checkpoint_in_official_layout_converts(tmp_path):
    # the official CBAM layout, DataParallel prefix and {'state_dict': ...} wrapper, as a weights-only .pth
    model = _perturbed_state("test_cbam_resnet")
    to_official = [(".se.channel.fc1.", ".cbam.ChannelGate.mlp.1."), (".se.channel.fc2.", ".cbam.ChannelGate.mlp.3."),
                   (".se.spatial.", ".cbam.SpatialGate.spatial.")]
    official = {}
    for k, v in model.state_dict().items():
        for a, b in to_official:
            k = k.replace(a, b)
        official["module." + k] = v
    assert any(".cbam." in k for k in official)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "epoch": 90}, path)
    backbone = AttnZooBackbone("test_cbam_resnet", checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    for got, want in zip(backbone(x), _reference_features(model, x)):
        torch.testing.assert_close(got, want)


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: not a weights-only checkpoint"):
        AttnZooBackbone("test_cbam_resnet", checkpoint=str(path))


class _Opaque:
    pass


def test_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path):
    """A file of foreign keys loaded nothing and said nothing: now strict by default, with the report."""
    path = tmp_path / "foo.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"foo\.safetensors does not fit test_nat: missing keys \[.*"
                                              r"unexpected keys \[foo\.weight\]"):
        AttnZooBackbone("test_nat", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="none of its tensors fit"):  # strict=False needs a partial fit
        AttnZooBackbone("test_nat", checkpoint=str(path), strict=False)


def test_strict_false_loads_what_fits_and_logs_the_report(tmp_path, caplog):
    model = _perturbed_state("test_nat")
    sd = dict(model.state_dict())
    gone = next(k for k in sd if k.startswith("levels.0.") and k.endswith("gamma1"))
    del sd[gone]
    sd["extra.weight"] = torch.zeros(2)
    sd["levels.1.blocks.0.mlp.fc1.bias"] = torch.zeros(3)  # wrong shape
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=rf"missing keys \[{gone}\]; unexpected keys \[extra\.weight\]; "
                                              r"shape mismatches \[levels\.1\.blocks\.0\.mlp\.fc1\.bias.*strict=False"):
        AttnZooBackbone("test_nat", checkpoint=str(path))
    with caplog.at_level("WARNING", logger="attnzoo.heads.backbone"):
        backbone = AttnZooBackbone("test_nat", checkpoint=str(path), strict=False)
    assert "partial.safetensors does not fit test_nat" in caplog.text and gone in caplog.text
    loaded = backbone.body.state_dict()
    key = "model.levels.0.blocks.0.mlp.fc1.weight"  # FeatureGetterNet keeps the model as .model
    torch.testing.assert_close(loaded[key], model.state_dict()[key[len("model."):]])


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_loads_every_stage_and_drops_the_rest(name, tmp_path):
    """Full-model files (classifier, final norm, later stages) load into any out_indices, strictly."""
    model = _perturbed_state(name)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = AttnZooBackbone(name, out_indices=(0, 1), checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    stages = [s["index"] for s in stage_info(name)][:2]
    want = model.eval().forward_intermediates(x, indices=stages, intermediates_only=True)
    for got, ref in zip(backbone(x), want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, damage, suffix):
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in timm.create_model("test_nat").state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"not weights\n" * 8}[damage])
    with pytest.raises(CheckpointError, match=rf"{path.name}: .*(truncated or corrupt|corrupt)"):
        AttnZooBackbone("test_nat", checkpoint=str(path))


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    path = tmp_path / "nat.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"checkpoint not found: .*nat\.safetensors; make it with: python "
                                                rf"tools/convert_checkpoint\.py --model test_nat .*--output .*"
                                                rf"nat\.safetensors.*checkpoint=None"):
        AttnZooBackbone("test_nat", checkpoint=str(path))


def test_drop_path_rate_and_model_kwargs_reach_the_model():
    backbone = AttnZooBackbone("test_nat", drop_path_rate=0.3, kernel_size=5)
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)
    kernels = {m.kernel_size for m in backbone.modules() if type(m).__name__ == "NeighborhoodAttention2d"}
    assert kernels == {(5, 5)}


def test_bad_arguments_name_the_model():
    with pytest.raises(ValueError, match="out_indices.*test_nat"):
        AttnZooBackbone("test_nat", out_indices=(2, 1))
    with pytest.raises(ValueError, match="out_indices.*test_nat"):
        AttnZooBackbone("test_nat", out_indices=(0, 4))
    with pytest.raises(ValueError, match="frozen_stages.*test_nat"):
        AttnZooBackbone("test_nat", frozen_stages=5)
