"""Datasets, SimCLR augmentations and loaders for contrastive clustering.

`load_dataset(name, root)` reads a benchmark from its standard files into an ImageDataset;
`make_train_loader` yields two augmented views plus the clean view per batch (torchvision or
NVIDIA DALI backend, reproducible from (seed, epoch, batch)); `make_eval_loader` yields the clean
images in order for evaluation.
"""

from .augment import AugmentSpec, ViewParams, augment_preset, sample_view_params
from .datasets import (
    DATASETS,
    IMAGENET10_WNIDS,
    IMAGENET_DOGS_WNIDS,
    ImageDataset,
    default_image_size,
    load_dataset,
)
from .loader import (
    AUGMENT_BACKENDS,
    EvalLoader,
    TrainLoader,
    choose_backend,
    make_eval_loader,
    make_train_loader,
)

__all__ = [
    "DATASETS",
    "IMAGENET10_WNIDS",
    "IMAGENET_DOGS_WNIDS",
    "ImageDataset",
    "load_dataset",
    "default_image_size",
    "AugmentSpec",
    "ViewParams",
    "augment_preset",
    "sample_view_params",
    "AUGMENT_BACKENDS",
    "TrainLoader",
    "EvalLoader",
    "make_train_loader",
    "make_eval_loader",
    "choose_backend",
]
