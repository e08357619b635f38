"""moco-pretrain: MoCo v1/v2 pretraining and its Detectron2 detection-transfer benchmark."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


setup(
    name="moco-pretrain",
    version="0.1.0",
    description="MoCo v1/v2 self-supervised pretraining of ResNets and Detectron2 detection transfer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # tools/ holds scripts and is never installed: detectron2 installs a top-level `tools` package.
    # The repository's configs/ is installed as moco_pretrain/_configs, where installed commands
    # find the recipes (an editable install reads configs/ itself).
    packages=[
        *find_packages(include=["moco_pretrain", "moco_pretrain.*", "transfer", "transfer.*"]),
        "moco_pretrain._configs",
    ],
    package_dir={"moco_pretrain._configs": "configs"},
    package_data={"moco_pretrain._configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # torch 2.6: the (object, "module.name") pairs of torch.serialization.safe_globals, by
        # which moco-convert reads other projects' plain data as inert records (CI runs the
        # newest torch); torchvision 0.21 is 2.6's
        "torch>=2.6",
        "torchvision>=0.21",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "yacs>=0.1.8",
        "tensorboard>=2.12",
        "tqdm>=4.64",
        "numpy>=1.24",
        "pillow>=9.0",
        "matplotlib>=3.6",
        "scipy>=1.10",  # Student-t quantiles and p-values for moco-report's intervals
        "safetensors>=0.4",  # timm / Hugging Face .safetensors checkpoints for moco-convert
    ],
    extras_require={
        # detectron2 itself is not on PyPI: install it from its official repository (README).
        "detection": ["pycocotools>=2.0.6", "setuptools<81"],
        "slurm": ["submitit>=1.5"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "ruff>=0.4", "submitit>=1.5"],
    },
    entry_points={
        "console_scripts": [
            "moco-pretrain=moco_pretrain.cli.pretrain:main",
            "moco-lincls=moco_pretrain.cli.lincls:main",
            "moco-knn=moco_pretrain.cli.knn:main",
            "moco-submit=moco_pretrain.cli.submit:main",
            "moco-convert=transfer.convert:main",
            "moco-transfer=transfer.train_net:main",
            "moco-report=moco_pretrain.report:main",
            "moco-benchmark=transfer.benchmark:main",
        ]
    },
)
