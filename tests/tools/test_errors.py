"""What the tools and the ``pretrained_cfg_overlay=dict(file=...)`` path say about missing, damaged or
ill-fitting weights files and unscorable data: one line that names the file and the fix."""
import os

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from attnzoo.backbones._helpers import CheckpointError
from tools import _common as C
from tools import convert_checkpoint as convert
from tools import validate

MODEL = "test_cbam_resnet"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _weights(tmp_path, name=MODEL, num_classes=10, suffix=".safetensors"):
    sd = {k: v.contiguous() for k, v in timm.create_model(name, num_classes=num_classes).state_dict().items()}
    path = tmp_path / f"{name}{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    return path, sd


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not weights\n" * 8}[how])
    return path


# ----------------------------------------------------------------------------- validate.py


def test_validate_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: checkpoint not found: .*missing\.safetensors; train one with "
                                         r"python tools/train\.py --model test_cbam_resnet .*"
                                         r"python tools/convert_checkpoint\.py --model test_cbam_resnet"):
        validate.main(["--model", MODEL, "--checkpoint", str(tmp_path / "missing.safetensors"), "--no-progress"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_validate_damaged_checkpoint_is_named(tmp_path, suffix, how):
    path = _damage(_weights(tmp_path, suffix=suffix)[0], how)
    with pytest.raises(SystemExit, match=rf"^error: {path}: .*(truncated or corrupt|corrupt)"):
        validate.main(["--model", MODEL, "--num-classes", "10", "--checkpoint", str(path), "--no-progress",
                       "--results-file", str(tmp_path / "r.csv")])


def test_validate_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        validate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and text.count("(default: 64)") == 1
    assert "default: from the checkpoint's metadata" in text


# ----------------------------------------------------------------------------- eval folders


def _png(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)


def test_image_folder_follows_links_once(tmp_path):
    """A link loop (``0/loop -> ..``), a link to another class and a file linked twice add nothing;
    a link to a directory outside the tree is followed."""
    root = tmp_path / "data"
    _png(root / "0" / "a.png")
    _png(root / "1" / "b.png")
    _png(tmp_path / "outside" / "c.png")
    os.symlink("..", root / "0" / "loop")
    os.symlink(root / "1", root / "0" / "other_class")
    os.symlink(root / "0" / "a.png", root / "0" / "again.png")
    os.symlink(tmp_path / "outside", root / "1" / "more")
    ds = C.SafeImageFolder(root)
    got = sorted((os.path.relpath(p, root), t) for p, t in ds.samples)
    assert got == [("0/a.png", 0), ("1/b.png", 1), ("1/more/c.png", 1)]


def test_validate_refuses_to_score_no_readable_image(tmp_path):
    (tmp_path / "val" / "0").mkdir(parents=True)
    (tmp_path / "val" / "0" / "x.png").write_bytes(b"not an image\n")
    argv = ["--model", MODEL, "--num-classes", "2", "--data-dir", str(tmp_path), "--img-size", "32",
            "--workers", "0", "--no-progress", "--results-file", str(tmp_path / "r.csv")]
    with pytest.raises(SystemExit, match=r"nothing to score: none of the 1 files in .* is a readable image"):
        validate.main(argv)
    (tmp_path / "val" / "0" / "x.png").unlink()
    with pytest.raises(SystemExit, match="nothing to score: no files"):
        validate.main(argv)
    assert not (tmp_path / "r.csv").exists()


# ----------------------------------------------------------------------------- convert_checkpoint.py


def test_convert_missing_input_says_what_to_download(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --input not found: .*missing\.pth\.tar; download the official "
                                         r"eca_resnet50 checkpoint \(from https://github\.com/BangguWu/ECANet\)"):
        convert.main(["--model", "eca_resnet50", "--input", str(tmp_path / "missing.pth.tar"),
                      "--output", str(tmp_path / "o.safetensors")])


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_convert_damaged_input_is_named(tmp_path, how):
    path = _damage(_weights(tmp_path, suffix=".pth")[0], how)
    with pytest.raises(SystemExit, match=rf"^error: {path}: .*(truncated or corrupt|corrupt)"):
        convert.main(["--model", MODEL, "--input", str(path), "--output", str(tmp_path / "o.safetensors")])


def test_convert_wrong_model_is_one_line_naming_the_file(tmp_path):
    path, _ = _weights(tmp_path, name="test_nat", suffix=".pth")
    with pytest.raises(SystemExit, match=rf"^error: {path}: checkpoint does not match"):
        convert.main(["--model", MODEL, "--input", str(path), "--output", str(tmp_path / "o.safetensors")])


def _expected_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_written_checkpoints_have_the_usual_file_mode(tmp_path):
    """safetensors creates its files 0600; ours follow the umask like every other output."""
    path, _ = _weights(tmp_path, suffix=".pth")
    out = tmp_path / "converted.safetensors"
    convert.main(["--model", MODEL, "--input", str(path), "--output", str(out)])
    C.save_checkpoint(tmp_path / "trained.safetensors", timm.create_model(MODEL, num_classes=10), {"model": MODEL})
    for f in (out, tmp_path / "trained.safetensors"):
        assert os.stat(f).st_mode & 0o777 == _expected_mode(), f
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- timm.create_model(file=...)


def test_pretrained_file_missing_says_how_to_make_it(tmp_path):
    path = tmp_path / "mine.safetensors"
    with pytest.raises(FileNotFoundError, match=r"pretrained file not found: .*mine\.safetensors; make it with: "
                                                r"python tools/convert_checkpoint\.py --model test_nat"):
        timm.create_model("test_nat", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_damaged_is_named(tmp_path, suffix):
    path = _damage(_weights(tmp_path, suffix=suffix)[0], "truncated")
    with pytest.raises(CheckpointError, match=rf"{path.name}: .*truncated or corrupt"):
        timm.create_model(MODEL, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_file_classifier_size_suggests_num_classes(tmp_path):
    path, sd = _weights(tmp_path, name="test_eca_resnet")
    with pytest.raises(CheckpointError, match=r"classifier fc has 10 classes, test_eca_resnet has 1000 by default: "
                                              r"pass num_classes=10"):
        timm.create_model("test_eca_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # with it, the file's classifier loads too (timm alone dropped it whenever num_classes != its cfg's)
    model = timm.create_model("test_eca_resnet", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k

