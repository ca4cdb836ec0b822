"""Train loader (two augmented views + the clean view) and eval loader (clean view, in order).

Reproducibility contract: epoch e's order is a permutation seeded by (seed, e), identical on all
ranks; rank r of world_size takes every world_size-th element of it (disjoint slices of equal
length, as DistributedSampler), so the ranks' batches k together are the images of batch k of
one process with world_size times the batch size. Batch k's augmentation parameters are drawn
for that global batch from a generator seeded by (seed, e, k) (see `augment`), each rank taking
its images' rows. So `loader.epoch(e, start_batch=k)` yields exactly batches
k, k+1, ... of an uninterrupted `loader.epoch(e)`, whatever the backend or number of workers.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from .augment import (
    AugmentSpec,
    ViewParams,
    augment_preset,
    digit_view,
    sample_view_params,
    torchvision_view,
)
from .datasets import DATASETS, ImageDataset

log = logging.getLogger(__name__)

AUGMENT_BACKENDS = ("auto", "dali", "torchvision")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_dataset(dataset) -> None:
    if not isinstance(dataset, ImageDataset):
        raise TypeError(
            "dataset must be an ImageDataset (from fastcluster_cl.data.load_dataset),"
            f" got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, C, size, size), antialiased; unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as F

    return F.resize(images, [size, size], antialias=True)


class _Normalise:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std on the target device."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float -> pixels in [0, 1]."""
        return x * self.std + self.mean

    def forward_from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> normalised float."""
        return (x - self.mean) / self.std


def choose_backend(augment: str, device: torch.device) -> tuple[str, str]:
    """Resolve `augment` to ("dali" | "torchvision", why). "auto" takes DALI only when it
    imports and the device is CUDA; an explicit "dali" without DALI raises ImportError."""
    from .dali import dali_unavailable_reason

    if augment not in AUGMENT_BACKENDS:
        raise ValueError(f"augment must be one of {AUGMENT_BACKENDS}, got {augment!r}")
    if augment == "torchvision":
        return "torchvision", "requested"
    if augment == "auto" and device.type != "cuda":
        return "torchvision", f"device is {device.type}; 'auto' uses DALI on CUDA devices only"
    reason = dali_unavailable_reason()
    if augment == "dali":
        if reason is not None:
            raise ImportError(
                f"augment='dali' but {reason}; install it with "
                "pip install fastcluster_cl[dali], or pass augment='torchvision'"
            )
        return "dali", "requested"
    if reason is not None:
        return "torchvision", reason
    return "dali", "DALI importable and device is CUDA"


class TrainLoader:
    """Batches of two SimCLR views plus the clean view; see `make_train_loader`.

    Attributes: backend ("dali" | "torchvision"), backend_reason, batch_size, image_size,
    spec (AugmentSpec), mean/std (per channel), device, seed, rank, world_size, drop_last.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        image_size: int,
        spec: AugmentSpec,
        backend: str,
        backend_reason: str,
        device: torch.device,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        num_workers: int,
    ):
        self.dataset, self.batch_size, self.image_size, self.spec = (
            dataset,
            batch_size,
            image_size,
            spec,
        )
        self.backend, self.backend_reason, self.device = backend, backend_reason, device
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.num_workers = num_workers
        self.mean, self.std = dataset.mean_std
        self.per_rank = len(dataset) // world_size
        self._normalise = _Normalise(self.mean, self.std, device)
        self._dali = None
        if len(self) == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {self.per_rank} images of "
                f"rank {rank} with drop_last=True; lower batch_size or pass "
                "drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for `epoch`, in batch order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield this rank's batches start_batch, ..., len(self) - 1 of `epoch` as dicts
        {"a", "b", "clean": float32 (B, C, S, S) normalised, "label", "index": int64 (B,)}
        on the loader's device."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if (
            isinstance(start_batch, bool)
            or not isinstance(start_batch, (int, np.integer))
            or not 0 <= start_batch <= len(self)
        ):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}], got {start_batch!r}")
        return self._batches(_EpochBatches(self, int(epoch)), int(start_batch))

    def _batches(self, source: _EpochBatches, start_batch: int):
        if self.backend == "dali":
            for k in range(start_batch, len(self)):
                yield self._dali_batch(source, k)
            return
        pin = self.device.type == "cuda"
        # DataLoader draws its worker base seed when an iterator starts; a private generator
        # keeps that draw off torch's global RNG, which the model's own sampling uses.
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(
            source,
            batch_size=None,
            sampler=range(start_batch, len(self)),
            num_workers=self.num_workers,
            pin_memory=pin,
            generator=generator,
        )
        for batch in loader:
            out = {
                key: self._normalise(batch[key].to(self.device, non_blocking=pin))
                for key in ("a", "b", "clean")
            }
            out["label"] = batch["label"].to(self.device, non_blocking=pin)
            out["index"] = batch["index"].to(self.device, non_blocking=pin)
            yield out

    def digit_ops_normalised(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """`digit_view` on a normalised float batch (the DALI path): to [0, 1] pixels, the digit
        operations, normalised again."""
        return self._normalise.forward_from_unit(
            digit_view(self._normalise.to_unit(x), p, self.spec)
        )

    def _dali_batch(self, source: _EpochBatches, k: int) -> dict:
        from .dali import DaliTwoViewPipeline

        if self._dali is None:
            device_id = None
            if self.device.type == "cuda":
                device_id = (
                    self.device.index
                    if self.device.index is not None
                    else torch.cuda.current_device()
                )
            self._dali = DaliTwoViewPipeline(
                self.batch_size,
                self.image_size,
                self.spec,
                self.mean,
                self.std,
                device_id=device_id,
                num_threads=max(1, self.num_workers),
            )
        indices = source.indices(k)
        params = source.params(k)
        a, b, clean = self._dali.run(self.dataset.images[indices], *params)
        if self.spec.uses_digit_ops:
            # DALI has no batched counterpart of the digit operations (per-image elastic
            # fields, seeded noise): they run as the same torch ops (`digit_view`) with the
            # same parameters on DALI's output, in [0, 1] pixels on the loader's device. The
            # torchvision path rounds their result to uint8, this one keeps float32.
            a, b = (self.digit_ops_normalised(x, p) for x, p in zip((a, b), params))
        return {
            "a": a,
            "b": b,
            "clean": clean,
            "label": torch.from_numpy(self.dataset.labels[indices]).to(self.device),
            "index": torch.from_numpy(indices.astype(np.int64)).to(self.device),
        }


def _rows(params: ViewParams, rows: slice) -> ViewParams:
    """The parameters of a subset of a batch's images."""
    return ViewParams(
        **{
            f.name: None if getattr(params, f.name) is None else getattr(params, f.name)[rows]
            for f in dataclasses.fields(params)
        }
    )


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch of one rank: batch k's indices and augmentation parameters, and (the
    torchvision backend's DataLoader items) batch k as uint8 CPU tensors. Holds only NumPy data
    and plain settings, so worker processes never receive device tensors."""

    def __init__(self, loader: TrainLoader, epoch: int):
        self.dataset, self.spec, self.epoch = loader.dataset, loader.spec, epoch
        self.batch_size, self.image_size, self.length = (
            loader.batch_size,
            loader.image_size,
            len(loader),
        )
        self.seed, self.rank, self.world_size = loader.seed, loader.rank, loader.world_size
        self.order = loader.order(epoch)

    def __len__(self) -> int:
        return self.length

    def indices(self, k: int) -> np.ndarray:
        return self.order[k * self.batch_size : (k + 1) * self.batch_size]

    def params(self, k: int):
        """(view a, view b) parameters of batch k: drawn for the global batch k (all ranks
        together) from a generator seeded by (seed, epoch, k), of which this rank's images hold
        the positions rank::world_size. A global batch is thus augmented identically whatever
        the number of ranks (resuming on another world size stays exact)."""
        rng = np.random.default_rng([self.seed, self.epoch, k])
        n = len(self.indices(k)) * self.world_size
        _, height, width, _ = self.dataset.images.shape
        return tuple(
            _rows(
                sample_view_params(rng, n, height, width, self.spec),
                slice(self.rank, None, self.world_size),
            )
            for _ in range(2)
        )

    def __getitem__(self, k: int) -> dict:
        # Per-image ops on small tensors: intra-op threads only add overhead (and stall badly on
        # a loaded machine), so build the batch on one thread, as DataLoader workers do.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._batch(k)
        finally:
            torch.set_num_threads(threads)

    def _batch(self, k: int) -> dict:
        indices = self.indices(k)
        images = torch.from_numpy(self.dataset.images[indices]).permute(0, 3, 1, 2)
        params_a, params_b = self.params(k)
        size, spec = self.image_size, self.spec
        return {
            "a": torchvision_view(images, params_a, size, spec),
            "b": torchvision_view(images, params_b, size, spec),
            "clean": _resize(images.contiguous(), size),
            "label": torch.from_numpy(self.dataset.labels[indices]),
            "index": torch.from_numpy(indices.astype(np.int64)),
        }


def make_train_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    image_size: int | None = None,
    augment: str = "auto",
    device="cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    num_workers: int = 0,
    spec: AugmentSpec | None = None,
) -> TrainLoader:
    """A reproducible, shardable two-view training loader (see the module docstring).

    Args:
        dataset: an ImageDataset. batch_size: images per batch on this rank.
        image_size: output side S; None keeps the dataset's stored size.
        augment: "auto" (DALI when it imports and device is CUDA, else torchvision), "dali"
            (ImportError when DALI is missing; runs on CPU with device "cpu"), "torchvision".
        device: where batches are delivered. seed: base seed of orders and augmentations.
        rank, world_size: this process's shard (DDP). drop_last: drop the partial last batch.
        num_workers: torchvision: DataLoader worker processes; DALI: CPU threads.
        spec: augmentation; None takes the dataset's preset (`augment_preset`).
    """
    _check_dataset(dataset)
    batch_size = _positive_int("batch_size", batch_size)
    image_size = (
        dataset.image_size if image_size is None else _positive_int("image_size", image_size)
    )
    world_size = _positive_int("world_size", world_size)
    if (
        isinstance(rank, bool)
        or not isinstance(rank, (int, np.integer))
        or not (0 <= rank < world_size)
    ):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if len(dataset) < world_size:
        raise ValueError(f"{len(dataset)} images cannot be split over {world_size} ranks")
    if spec is None:
        if dataset.name not in DATASETS:
            raise ValueError(
                f"no augmentation preset for dataset {dataset.name!r}; pass spec=AugmentSpec(...)"
            )
        spec = augment_preset(dataset.name)
    if spec.uses_colour and dataset.channels != 3:
        raise ValueError(
            f"spec has colour jitter/grayscale but {dataset.name!r} has "
            f"{dataset.channels} channel(s); use jitter_p=0, gray_p=0"
        )
    device = torch.device(device)
    backend, reason = choose_backend(augment, device)
    log.info("augmentation backend: %s (%s)", backend, reason)
    return TrainLoader(
        dataset,
        batch_size,
        image_size,
        spec,
        backend,
        reason,
        device,
        int(seed),
        int(rank),
        world_size,
        bool(drop_last),
        num_workers,
    )


class EvalLoader:
    """Clean, normalised batches {"clean", "label", "index"}: every image once, in dataset
    order in batches of `batch_size`, or, given `order` (a permutation of the indices), in that
    order in ceil(len / batch_size) batches whose sizes differ by at most one."""

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        image_size: int,
        device: torch.device,
        order: np.ndarray | None = None,
    ):
        self.dataset, self.batch_size, self.image_size, self.device = (
            dataset,
            batch_size,
            image_size,
            device,
        )
        n = len(dataset)
        if order is None:
            order = np.arange(n, dtype=np.int64)
            self._batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
        else:
            order = np.asarray(order, dtype=np.int64)
            if not np.array_equal(np.sort(order), np.arange(n)):
                raise ValueError(f"order must be a permutation of the {n} image indices")
            self._batches = np.array_split(order, math.ceil(n / batch_size))
        self.mean, self.std = dataset.mean_std
        self._normalise = _Normalise(self.mean, self.std, device)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for index in self._batches:
            images = torch.from_numpy(self.dataset.images[index]).to(self.device)
            images = _resize(images.permute(0, 3, 1, 2).contiguous(), self.image_size)
            yield {
                "clean": self._normalise(images),
                "label": torch.from_numpy(self.dataset.labels[index]).to(self.device),
                "index": torch.from_numpy(index).to(self.device),
            }


def make_eval_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    image_size: int | None = None,
    device="cpu",
    shuffle_seed: int | None = None,
) -> EvalLoader:
    """Every image once, un-augmented (resized to image_size if given): in dataset order, or,
    with `shuffle_seed`, in a random order drawn from it, in batches of at most `batch_size`
    whose sizes differ by at most one. The shuffled form is for features taken with BatchNorm
    in training mode: datasets stored sorted by class (mnist5k) would otherwise give one-class
    batches, whose batch statistics erase the differences between the classes."""
    _check_dataset(dataset)
    batch_size = _positive_int("batch_size", batch_size)
    image_size = (
        dataset.image_size if image_size is None else _positive_int("image_size", image_size)
    )
    order = (
        None
        if shuffle_seed is None
        else np.random.default_rng(shuffle_seed).permutation(len(dataset))
    )
    return EvalLoader(dataset, batch_size, image_size, torch.device(device), order)
