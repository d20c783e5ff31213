from setuptools import find_packages, setup

# OpenMMLab stack for attnzoo.heads.mm: mmengine needs pkg_resources (setuptools<81) at run time, and
# mmseg imports ftfy and regex without declaring them; mmcv-lite's missing kernels come from torchvision
MM = [
    "mmengine==0.10.7", "mmcv-lite==2.1.0", "mmdet==3.3.0", "mmsegmentation==1.2.2",
    "pycocotools", "ftfy", "regex", "setuptools<81",
]
ONNX = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript"]  # onnxscript: torch's dynamo exporter (--dynamo)
TRAIN = ["albumentations>=2"]  # tools/train.py --aug albumentations
TEST = ["pytest", "pytest-xdist", "hypothesis", *MM, *ONNX, *TRAIN]  # CI (".[test]") runs the mm, ONNX and training tests

setup(
    name="attnzoo",
    version="0.1.0",
    description="Attention backbones for computer vision: fast ops, paper-faithful timm models",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["attnzoo", "attnzoo.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch", "torchvision", "timm>=1.0.21", "safetensors", "tqdm",
        "scikit-learn",  # ships the digits set that train/validate use by default
        "matplotlib",  # training curves
    ],
    extras_require={"mm": MM, "onnx": ONNX, "train": TRAIN, "test": TEST, "all": TEST},
    license="MIT",
)
