"""A run's settings: `TrainConfig` (every option of ``fastcluster-cl train``), its checks, and
`resolve`, which fills what the dataset and the presets decide."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..models import RESNETS
from ..validation import MIN_TEMPERATURE
from .checkpoint import CheckpointError

AMP_MODES = ("auto", "none", "bf16", "fp16")


def _option(setting: str) -> str:
    """The command-line option of a TrainConfig field."""
    return "--" + setting.replace("_", "-")


class ConfigError(ValueError):
    """A setting that cannot work (out of range for the dataset, the backbone or the
    checkpoint), found before the first step; names the command-line option."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


@dataclass
class TrainConfig:
    """Every setting of a run. None means "derive from the dataset" (see `resolve`)."""

    # None (and backbone "auto" where the preset names one) takes the (method, dataset) preset
    # of fastcluster_cl.train.presets; `resolve` fills them in.
    dataset: str = "digits"
    data_root: str | None = None
    method: str = "anchor"
    backbone: str = "auto"  # preset; else small_cnn < 32 px, resnet18 <= 64, resnet34
    cifar_stem: bool | None = None  # ResNets: 3x3 stem without max-pool; default for <= 64 px
    num_clusters: int | None = None  # default: the dataset's number of classes
    image_size: int | None = None  # default: the dataset's native training size
    in_channels: int | None = None  # read from the data
    projection_dim: int = 128
    hidden_dim: int = 512
    augment: str = "auto"
    epochs: int | None = None  # preset
    batch_size: int = 256  # global batch: split evenly over the ranks
    optimizer: str = "adam"
    lr: float | None = None  # preset
    weight_decay: float = 0.0
    warmup_epochs: float | None = None  # preset
    min_lr_factor: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    skip_nonfinite_steps: int = 0  # steps with a NaN/inf loss or gradient that may be skipped
    # (no update) before the run stops; 0: stop at the first
    center_warmup_epochs: int | None = None  # anchor: epochs of instance loss alone before the
    # k-means initialisation of the centers (DEC-style
    # pretraining); None: epochs // 8 for anchor, else 0
    instance_temperature: float | None = None  # preset
    cluster_temperature: float | None = None  # preset
    gumbel_temperature: float | None = None  # tcc: lambda of the assignment samples; preset
    tcc_prior: str | None = None  # tcc: "kl" (per-sample KL to uniform) or "marginal"
    # (CC's marginal entropy); preset
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss_backend: str = "auto"
    amp: str = "auto"  # auto: bf16 on CUDA, none on the CPU
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads for torch ops; None: torch's default
    eval_every: int = 0  # epochs between evaluations; 0: only at the end
    eval_batch_size: int = 512
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: epoch ends only
    log_every: int = 1  # steps between step records in log.jsonl / TensorBoard
    out: str | None = None
    plots: bool = True
    progress: bool = True

    # Settings a resumed run may change; all others must equal the checkpoint's.
    RESUMABLE = (
        "device",
        "threads",
        "out",
        "eval_every",
        "eval_batch_size",
        "checkpoint_every",
        "log_every",
        "plots",
        "progress",
        "compile",
        "data_root",
        "loss_backend",
        "sync_bn",
        "skip_nonfinite_steps",
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**values)

    def preset(self) -> dict[str, Any]:
        """The (method, dataset) preset (fastcluster_cl.train.presets)."""
        from .presets import preset

        return preset(self.method, self.dataset)

    def _check_types(self) -> None:
        """Each setting of its declared type (a checkpoint or a dict may hold anything), every
        float finite."""
        kinds = {
            "int": (int,),
            "float": (int, float),
            "bool": (bool,),
            "str": (str,),
            "dict": (dict,),
        }
        for f in dataclasses.fields(self):
            value, annotation = getattr(self, f.name), str(f.type)
            if value is None and "None" in annotation:
                continue
            base = annotation.split("|")[0].strip().split("[")[0]
            ok = isinstance(value, kinds[base]) and (base == "bool" or not isinstance(value, bool))
            if not ok:
                raise ValueError(
                    f"{f.name} must be {annotation.replace('|', 'or')}, got "
                    f"{value!r} ({type(value).__name__})"
                )
            if base == "float" and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")

    def check(self) -> None:
        """Raise ConfigError (a ValueError naming the option) on settings that cannot work, before
        any data is loaded; a value of the wrong type is a ValueError (`_check_types`)."""
        from ..models import BACKBONES, METHOD_HEADS
        from .optim import OPTIMIZERS

        self._check_types()
        if self.method not in METHOD_HEADS:
            raise ConfigError(
                "--method", f"method must be one of {tuple(METHOD_HEADS)}, got {self.method!r}"
            )
        if self.backbone != "auto" and self.backbone not in BACKBONES:
            raise ConfigError(
                "--backbone",
                f"backbone must be 'auto' or one of {BACKBONES}, got {self.backbone!r}",
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                "--optimizer", f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError("--amp", f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(_option(name), f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "instance_temperature", "cluster_temperature", "gumbel_temperature"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(_option(name), f"{name} must be > 0, got {getattr(self, name)}")
            if (
                name.endswith("temperature")
                and getattr(self, name) is not None
                and getattr(self, name) < MIN_TEMPERATURE
            ):  # the losses' limit (lightly's)
                raise ConfigError(
                    _option(name),
                    f"{name} must be >= 1e-8, got {getattr(self, name)}",
                )
        for name in (
            "weight_decay",
            "warmup_epochs",
            "grad_clip",
            "eval_every",
            "checkpoint_every",
            "skip_nonfinite_steps",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(_option(name), f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tcc_prior not in (None, "kl", "marginal"):
            raise ConfigError(
                "--tcc-prior", f"tcc_prior must be 'kl' or 'marginal', got {self.tcc_prior!r}"
            )
        if self.center_warmup_epochs is not None:
            if self.center_warmup_epochs and self.method != "anchor":
                raise ConfigError(
                    "--center-warmup-epochs",
                    "center_warmup_epochs applies to the anchor method (center head) only",
                )
            epochs = self.epochs if self.epochs is not None else self.preset()["epochs"]
            if not 0 <= self.center_warmup_epochs < epochs:
                raise ConfigError(
                    "--center-warmup-epochs",
                    f"center_warmup_epochs must be in [0, epochs={epochs}), "
                    f"got {self.center_warmup_epochs}",
                )
        for name in ("threads", "image_size", "in_channels", "projection_dim", "hidden_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(_option(name), f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_clusters is not None and self.num_clusters < 2:
            raise ConfigError(
                "--num-clusters", f"num_clusters must be >= 2, got {self.num_clusters}"
            )
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError("--seed", f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(
                "--min-lr-factor", f"min_lr_factor must be in [0, 1], got {self.min_lr_factor}"
            )
        from ..backends.dispatch import BACKENDS

        if self.loss_backend not in BACKENDS:
            raise ConfigError(
                "--loss-backend",
                f"loss_backend must be one of {BACKENDS}, got {self.loss_backend!r}",
            )
        for name, weight in self.loss_weights.items():
            if (
                not isinstance(name, str)
                or isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not 0 <= weight < math.inf
            ):
                raise ConfigError(
                    "--loss-weights",
                    f"loss_weights must map names to finite numbers >= 0, got {name!r}: {weight!r}",
                )


def resolve(config: TrainConfig, dataset) -> TrainConfig:
    """Fill the None / "auto" model settings from the dataset; the result is what checkpoints
    store and resumes compare."""
    c = copy.deepcopy(config)
    p = c.preset()
    for name in (
        "image_size",
        "epochs",
        "lr",
        "warmup_epochs",
        "instance_temperature",
        "cluster_temperature",
        "gumbel_temperature",
        "tcc_prior",
    ):
        if getattr(c, name) is None:
            setattr(c, name, p[name])
    if c.backbone == "auto":
        c.backbone = p["backbone"]
    if not c.loss_weights:
        c.loss_weights = p["loss_weights"]
    if (
        c.center_warmup_epochs is None
        and c.method == "anchor"
        and p["center_warmup_epochs"] is not None
        and p["center_warmup_epochs"] < c.epochs
    ):
        c.center_warmup_epochs = p["center_warmup_epochs"]  # else epochs // 8, below
    if c.center_warmup_epochs is not None and c.center_warmup_epochs >= c.epochs:
        raise ConfigError(
            "--center-warmup-epochs",
            f"center_warmup_epochs must be in [0, epochs={c.epochs}), got {c.center_warmup_epochs}",
        )
    if c.num_clusters is None:
        c.num_clusters = int(dataset.num_classes)
    if c.image_size is None:
        c.image_size = int(dataset.image_size)
    if c.backbone == "auto":
        c.backbone = (
            "small_cnn" if c.image_size < 32 else "resnet18" if c.image_size <= 64 else "resnet34"
        )
    if c.cifar_stem is None:
        c.cifar_stem = c.backbone in RESNETS and c.image_size <= 64
    if c.center_warmup_epochs is None:
        c.center_warmup_epochs = c.epochs // 8 if c.method == "anchor" else 0
    return c


def check_fits_dataset(config: TrainConfig, dataset, world_size: int) -> None:
    """Settings that the dataset makes impossible, refused before the first step: a batch
    larger than a rank's share of the images, and more clusters than the labelled images the
    final evaluation's k-means clusters."""
    per_rank = len(dataset) // world_size
    if distributed.local_batch_size(config.batch_size, world_size) > per_rank:
        share = f" ({per_rank} per rank over {world_size} ranks)" if world_size > 1 else ""
        raise ConfigError(
            "--batch-size",
            f"{config.batch_size} exceeds the {len(dataset)} "
            f"images of {dataset.name}{share}; lower it",
        )
    labelled = int((np.asarray(dataset.labels) >= 0).sum())
    if config.num_clusters > labelled:
        raise ConfigError(
            "--num-clusters",
            f"K = {config.num_clusters} exceeds the "
            f"{labelled} labelled images of {dataset.name}, which the "
            f"evaluation clusters; choose K <= {labelled}",
        )


def check_threads(state: dict[str, Any], device: torch.device, path) -> None:
    """CPU results depend on torch's thread count (the reductions split differently): a
    resume on the CPU must use the checkpoint's count to stay bit-exact, so another count is
    refused (checkpoints written before the count was stored are not checked)."""
    saved = state.get("cpu_threads")
    now = torch.get_num_threads()
    if device.type == "cpu" and saved is not None and saved != now:
        raise ConfigError(
            "--threads",
            f"checkpoint {path} was trained with {saved} CPU "
            f"threads and this resume would use {now}; CPU results depend on "
            f"the thread count, so pass --threads {saved} to continue exactly",
        )


def check_resumable(saved: dict[str, Any], asked: dict[str, Any], path) -> None:
    """Raise CheckpointError naming every setting that differs from the checkpoint's."""
    diffs = [
        f"{k}={asked[k]!r} (checkpoint: {saved.get(k)!r})"
        for k in asked
        if k not in TrainConfig.RESUMABLE and asked[k] != saved.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is incompatible with this run: " + ", ".join(diffs)
        )
