"""The training loop: two-view contrastive clustering with AMP, optional torch.compile, fused
optimizers, warmup + cosine schedule, gradient clipping, a non-finite-loss guard, periodic
evaluation, exact resume and JSONL/TensorBoard logs.

Device and rank live in one `Runtime` object; logging, checkpoints and plots happen only where
`runtime.is_main_process` is true. Under torchrun (docs/distributed.md) `Runtime.create`
initialises the process group, the model is wrapped in DistributedDataParallel, the losses
gather across ranks and each rank reads its shard: `batch_size` is the global batch, so a run
(and its checkpoints) means the same thing on any number of ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..metrics import cluster_metrics, kmeans_metrics
from ..models import RESNETS, build_model, method_loss_inputs
from ..modules import ClusterContrastiveLoss, LossOutput, NTXentLoss
from ..validation import MIN_TEMPERATURE, value_checks
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from .logging import RunLogger, last_per_step, read_log, write_text
from .optim import build_optimizer, optimizer_description
from .progress import make_progress
from .rundir import CHECKPOINT_NAME, RunDir
from .schedule import warmup_cosine

AMP_MODES = ("auto", "none", "bf16", "fp16")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or inf; training stops instead of corrupting the
    weights."""


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
    centre_warmup_epochs: int | None = None  # anchor: epochs of instance loss alone before the
    # k-means initialisation of the centres (DEC-style
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
        if self.centre_warmup_epochs is not None:
            if self.centre_warmup_epochs and self.method != "anchor":
                raise ConfigError(
                    "--centre-warmup-epochs",
                    "centre_warmup_epochs applies to the anchor method (centre head) only",
                )
            epochs = self.epochs if self.epochs is not None else self.preset()["epochs"]
            if not 0 <= self.centre_warmup_epochs < epochs:
                raise ConfigError(
                    "--centre-warmup-epochs",
                    f"centre_warmup_epochs must be in [0, epochs={epochs}), "
                    f"got {self.centre_warmup_epochs}",
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


@dataclass
class Runtime:
    """Where this process runs: its device, rank and world size (one place for DDP to extend)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, device: str = "auto") -> Runtime:
        """This process's runtime; under torchrun, also joins the process group and takes
        cuda:LOCAL_RANK (`fastcluster_cl.distributed.setup`)."""
        if (
            device != "auto"
            and torch.device(device).type == "cuda"
            and not torch.cuda.is_available()
        ):
            raise ValueError(f"device {device!r} asked for but CUDA is not available here")
        dev = distributed.setup(None if device == "auto" else device)
        return cls(dev, distributed.rank(), distributed.world_size())


# Weights and images channels-last on every device: tensor cores on CUDA; on the CPU a
# digit-CNN training step runs about 1.5x faster than in NCHW (oneDNN convolutions, vectorised
# pooling).
MEMORY_FORMAT = torch.channels_last


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device` (None: full precision)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


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
        c.centre_warmup_epochs is None
        and c.method == "anchor"
        and p["centre_warmup_epochs"] is not None
        and p["centre_warmup_epochs"] < c.epochs
    ):
        c.centre_warmup_epochs = p["centre_warmup_epochs"]  # else epochs // 8, below
    if c.centre_warmup_epochs is not None and c.centre_warmup_epochs >= c.epochs:
        raise ConfigError(
            "--centre-warmup-epochs",
            f"centre_warmup_epochs must be in [0, epochs={c.epochs}), got {c.centre_warmup_epochs}",
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
    if c.centre_warmup_epochs is None:
        c.centre_warmup_epochs = c.epochs // 8 if c.method == "anchor" else 0
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


class Trainer:
    """Owns model, loss, optimizer, schedule and loaders of one run; `fit()` trains to the end
    and returns the final metrics. `resume_from` continues a checkpoint exactly (same batches,
    same augmentations, same RNG streams)."""

    def __init__(
        self,
        config: TrainConfig,
        dataset=None,
        runtime: Runtime | None = None,
        resume_from: str | Path | None = None,
    ):
        config.check()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.runtime = runtime or Runtime.create(config.device)
        self.out = Path(config.out) if config.out else default_out_dir()
        self.fresh = resume_from is None
        self.rundir = None
        self.logger = RunLogger(self.out, enabled=False)
        if self.runtime.is_main_process:  # one writer per run directory, for the whole run
            from .checkpoint import resolve_checkpoint

            source = None if resume_from is None else resolve_checkpoint(resume_from)
            self.rundir = RunDir(self.out).open(resume_from=source)
        try:
            self._init(config, dataset, resume_from)
        except BaseException:
            self._abandon()
            raise

    def _init(self, config: TrainConfig, dataset, resume_from) -> None:
        from ..data import make_train_loader

        self.resume_state = None
        main = self.runtime.is_main_process
        if main:
            self.rundir.remove_temporary_checkpoints()  # left by a write killed mid-way
        if resume_from is not None:
            self.resume_state = load_checkpoint(resume_from)
        # Per-rank streams (e.g. TCC's Gumbel noise); DDP broadcasts rank 0's initial weights.
        seed_everything(config.seed + self.runtime.rank)
        config = self._setup_model(config, dataset)
        if self.resume_state is not None:
            check_resumable(self.resume_state["config"], config.to_dict(), resume_from)
            check_threads(self.resume_state, self.runtime.device, resume_from)
        config.out = str(self.out)
        dev = self.runtime.device
        check_fits_dataset(config, self.dataset, self.runtime.world_size)
        self.train_loader = make_train_loader(
            self.dataset,
            distributed.local_batch_size(config.batch_size, self.runtime.world_size),
            image_size=config.image_size,
            augment=config.augment,
            device=dev,
            seed=config.seed,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.criterion = ClusterContrastiveLoss(
            config.method,
            config.instance_temperature,
            config.cluster_temperature,
            weights=config.loss_weights or None,
            gumbel_tau=config.gumbel_temperature,
            backend=config.loss_backend,
            gather_distributed=self.runtime.world_size > 1,
            tcc_prior=config.tcc_prior,
            alpha=getattr(self.model.cluster_head, "alpha", 1.0),
        )
        self.ddp_model = distributed.wrap_model(
            self.model, dev, config.sync_bn, find_unused_parameters=config.centre_warmup_epochs > 0
        )
        self.optimizer = build_optimizer(
            config.optimizer, self.model, config.lr, config.weight_decay, dev
        )
        total = config.epochs * self.steps_per_epoch
        self.scheduler = warmup_cosine(
            self.optimizer,
            round(config.warmup_epochs * self.steps_per_epoch),
            total,
            config.min_lr_factor,
        )
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        self.instance_loss = NTXentLoss(
            config.instance_temperature,
            backend=config.loss_backend,
            gather_distributed=self.runtime.world_size > 1,
        )
        self.forward = torch.compile(self.ddp_model) if config.compile else self.ddp_model
        self.loss_fn = torch.compile(self.criterion) if config.compile else self.criterion
        self.epoch, self.batch, self.step = 0, 0, 0
        self.train_seconds, self.images_seen = 0.0, 0
        self.skipped_steps = 0  # non-finite steps skipped so far (--skip-nonfinite-steps)
        if self.resume_state is not None:
            self._load_state(self.resume_state)
        if main:
            self._claim("log.jsonl", "tensorboard", "config.json")
        self.logger = RunLogger(self.out, enabled=main)
        if main:
            write_text(self.out / "config.json", json.dumps(config.to_dict(), indent=2))

    def _claim(self, *names: str) -> None:
        """Mark `names` as this run's in the run directory before writing them (main process;
        the others write nothing)."""
        if self.rundir is not None:
            for name in names:
                self.rundir.claim(name)

    def _abandon(self) -> None:
        """After a failure: a start (fresh, or a resume into a new --out) that wrote no
        checkpoint removes what it wrote, and nothing else (no dead end: the same --out works
        again); otherwise the run stays resumable. The lock is released either way."""
        self.logger.close()
        if self.rundir is None:
            return
        if not (self.out / CHECKPOINT_NAME).exists():
            self.rundir.discard()
        self.rundir.release()

    def close(self) -> None:
        """Release the run directory (fit() does this when it ends)."""
        self.logger.close()
        if self.rundir is not None:
            self.rundir.release()

    def _setup_model(self, config: TrainConfig, dataset) -> TrainConfig:
        """Load the dataset, resolve the config from it, build the eval loader and the model.
        Sets self.config (resolved), dataset, eval_loader, model, amp_dtype."""
        from ..data import load_dataset, make_eval_loader

        self.dataset = (
            dataset if dataset is not None else load_dataset(config.dataset, config.data_root)
        )
        config = resolve(config, self.dataset)
        dev = self.runtime.device
        self.eval_loader = make_eval_loader(
            self.dataset, config.eval_batch_size, image_size=config.image_size, device=dev
        )
        sample = next(iter(self.eval_loader))["clean"]
        if config.in_channels is None:
            config.in_channels = int(sample.shape[1])
        self.config = config
        self.model = build_model(
            config.method,
            config.backbone,
            config.num_clusters,
            config.in_channels,
            config.cifar_stem,
            config.projection_dim,
            config.hidden_dim,
            config.gumbel_temperature,
        ).to(dev)
        self.model = self.model.to(memory_format=MEMORY_FORMAT)
        self.amp_dtype = amp_dtype(config.amp, dev)
        self._check_image_size(sample[:2])
        return config

    @torch.no_grad()
    def _check_image_size(self, images: torch.Tensor) -> None:
        """One forward of two images in eval mode (no state changes, no RNG drawn): an image
        size the backbone cannot take fails here, before the first step, naming the option."""
        devices = [self.runtime.device] if self.runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                self.model(self._inputs({"clean": images}, ("clean",)))
            except RuntimeError as err:
                raise ConfigError(
                    "--image-size",
                    f"{self.config.image_size} px is too small "
                    f"for backbone {self.config.backbone} "
                    f"({str(err).splitlines()[0]}); use a larger --image-size "
                    "or another --backbone",
                ) from None
            finally:
                self.model.train()

    @classmethod
    def for_evaluation(
        cls,
        config: TrainConfig,
        state: dict[str, Any],
        runtime: Runtime | None = None,
        dataset=None,
    ) -> Trainer:
        """A Trainer holding only what `evaluate` needs, with the checkpoint's weights; the
        dataset is loaded by config.dataset unless given."""
        self = cls.__new__(cls)
        self.runtime = runtime or Runtime.create(config.device)
        self._setup_model(config, dataset)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint weights do not fit the model: {str(err).splitlines()[0]}"
            ) from err
        return self

    # ----------------------------------------------------------------------------------- state
    def _load_state(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint does not fit this model/optimizer: {str(err).splitlines()[0]}"
            ) from err
        pos = state["position"]
        self.epoch, self.batch, self.step = pos["epoch"], pos["batch"], pos["step"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.images_seen = state.get("images_seen", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        set_rng_state(state["rng"])
        if self.runtime.rank:  # the checkpoint holds rank 0's streams; keep the ranks' apart
            seed_everything(self.config.seed + self.runtime.rank + 1_000_003 * self.step)

    def save(self) -> Path | None:
        """Write checkpoint.pt (atomic) with everything needed to continue exactly."""
        if not self.runtime.is_main_process:
            return None
        self._claim(CHECKPOINT_NAME)
        path = save_checkpoint(
            self.out / CHECKPOINT_NAME,
            {
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
                "train_seconds": self.train_seconds,
                "images_seen": self.images_seen,
                "skipped_steps": self.skipped_steps,
                "cpu_threads": torch.get_num_threads(),
            },
        )
        self.logger.log("checkpoint", epoch=self.epoch, batch=self.batch, step=self.step)
        return path

    # ---------------------------------------------------------------------------------- steps
    def _inputs(self, batch: dict, keys: tuple[str, ...]) -> torch.Tensor:
        x = torch.cat([batch[k] for k in keys]).to(self.runtime.device, non_blocking=True)
        x = x.contiguous(memory_format=MEMORY_FORMAT)
        return x

    def _views(self, batch: dict, keys: tuple[str, ...]) -> list[torch.Tensor]:
        return [self._inputs(batch, (k,)) for k in keys]

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on a two-view (plus clean view for anchor) batch."""
        anchor = self.config.method == "anchor"
        # Before the centres are initialised (centre warmup) only the instance loss trains.
        warmup = not bool(getattr(self.model.cluster_head, "initialised", True))
        views = ("a", "b", "clean") if anchor and not warmup else ("a", "b")
        with torch.autocast(
            self.runtime.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            # one pass per view (per-view BatchNorm statistics), in one call of the model
            split = self.forward(self._views(batch, views))
            if warmup:
                instance = self.instance_loss(split[0]["z"], split[1]["z"])
                loss = LossOutput(instance, {"instance": instance})
            else:
                inputs = method_loss_inputs(self.model, self.config.method, *split)
                loss = self.loss_fn(split[0]["z"], split[1]["z"], **inputs)
        total = loss.total.float()
        # Logged values are the global batch's (mean over ranks), and the gradients are
        # all-reduced, so every rank sees the same verdict of the finite checks below and all
        # stop (or skip) together.
        world = self.runtime.world_size
        logged = (
            distributed.all_reduce_sum(
                torch.stack([total.detach()] + [v.detach().float() for v in loss.parts.values()])
            )
            / world
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        # The gradient norm: clipping computes it anyway; without clipping it is one fused
        # norm over the gradients. Under fp16's GradScaler inf/NaN gradients are expected (the
        # scaler skips those steps and lowers the scale), so only the loss is checked there.
        norm = None
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        elif not self.scaler.is_enabled():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        stats = (
            logged
            if norm is None
            else torch.cat([logged, norm.detach().float().reshape(1).to(logged.device)])
        )
        values = stats.tolist()  # the step's one device sync: loss, parts and gradient norm
        n_parts = len(loss.parts)
        record = {
            "loss": values[0],
            **{f"loss_{k}": v for k, v in zip(loss.parts, values[1 : 1 + n_parts])},
        }
        grad_norm = values[1 + n_parts] if norm is not None else None
        if self.config.grad_clip > 0:
            record["grad_norm"] = grad_norm
        check_grad = grad_norm is not None and not self.scaler.is_enabled()
        if not math.isfinite(values[0]) or (check_grad and not math.isfinite(grad_norm)):
            return self._non_finite_step(record, grad_norm, loss.parts)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        record["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return record

    def _non_finite_step(self, record: dict, grad_norm: float | None, parts) -> dict:
        """A NaN/inf loss or gradient: stop with NonFiniteLossError, or, while fewer than
        config.skip_nonfinite_steps were skipped, drop the update (weights and optimizer state
        untouched; the schedule advances, as the batch is used up) and mark the record."""
        loss_text = ", ".join(f"{k}={v:.4g}" for k, v in record.items())
        if not math.isfinite(record["loss"]):
            what = f"loss is {record['loss']}"
            detail = ", ".join(f"{k}={record['loss_' + k]:.4g}" for k in parts)
        else:
            what = f"gradient norm is {grad_norm} (the loss is finite)"
            detail = loss_text
        where = f"{what} at epoch {self.epoch} step {self.step} ({detail})"
        limit = self.config.skip_nonfinite_steps
        if self.skipped_steps >= limit:
            self.optimizer.zero_grad(set_to_none=True)
            hint = "lower --lr, set --grad-clip, or use --amp bf16/none instead of fp16" + (
                "; --skip-nonfinite-steps N skips up to N such steps"
                if limit == 0
                else f"; {limit} such steps were skipped already (--skip-nonfinite-steps {limit})"
            )
            raise NonFiniteLossError(f"{where}; {hint}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # forget this step's inf checks; back off as on overflow
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.skipped_steps += 1
        record["skipped"] = where
        record["lr"] = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return record

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _features(self, train_mode: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features h, cluster-head predictions, labels) of every clean image, in dataset
        order. train_mode: BatchNorm on batch statistics, as the loss sees it, so the images
        go in shuffled, class-mixed batches (the eval loader's batches follow the dataset's
        order: one class per batch for a dataset stored sorted by class) of the global batch
        size, the same on every rank and for any number of ranks, so the features, and the
        centres initialised from them, do not depend on the world size (under sync_bn these
        are exactly the training statistics; without it each rank's loss sees its share)."""
        from ..data import make_eval_loader

        loader = self.eval_loader
        buffers = None
        if train_mode:
            buffers = copy.deepcopy(dict(self.model.named_buffers()))
            loader = make_eval_loader(
                self.dataset,
                self.config.batch_size,
                image_size=self.config.image_size,
                device=self.runtime.device,
                shuffle_seed=self.config.seed,
            )
        self.model.train(train_mode)
        feats, preds, labels, index = [], [], [], []
        try:
            for batch in loader:
                with torch.autocast(
                    self.runtime.device.type,
                    dtype=self.amp_dtype,
                    enabled=self.amp_dtype is not None,
                ):
                    out = self.model(self._inputs(batch, ("clean",)))
                    if bool(getattr(self.model.cluster_head, "initialised", True)):
                        preds.append(self.model.probabilities(out).argmax(1).cpu())
                feats.append(out["h"].float().cpu())
                labels.append(torch.as_tensor(batch["label"]).cpu())
                index.append(torch.as_tensor(batch["index"]).cpu())
        finally:
            self.model.train()
            if buffers is not None:  # train-mode BN updated its running stats: undo that
                for name, buf in self.model.named_buffers():
                    buf.copy_(buffers[name])
        order = torch.argsort(torch.cat(index)).numpy()  # back to dataset order
        pred = torch.cat(preds).numpy()[order] if preds else None
        return torch.cat(feats).numpy()[order], pred, torch.cat(labels).numpy()[order]

    def evaluate(self) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        """Cluster-head metrics (nmi, acc, ari) and k-means-on-features metrics."""
        start = time.perf_counter()
        feats, pred, labels = self._features()
        known = labels >= 0  # unlabelled images (label -1, STL-10's extra split) are not scored
        # no cluster-head metrics while the centres await their initialisation
        head = cluster_metrics(labels[known], pred[known]) if pred is not None else {}
        metrics = {
            **head,
            "kmeans": kmeans_metrics(
                feats[known], labels[known], self.config.num_clusters, seed=self.config.seed
            ),
            # k-means on L2-normalised features: the cosine geometry the contrastive
            # losses train (less prone to merging clusters than raw features)
            "kmeans_l2": kmeans_metrics(
                _l2_rows(feats[known]),
                labels[known],
                self.config.num_clusters,
                seed=self.config.seed,
            ),
            "eval_seconds": time.perf_counter() - start,
        }
        return metrics, feats, pred, labels

    def init_centres(self) -> None:
        """k-means on the features of the current network (BatchNorm in training mode, as the
        loss will see them; running statistics left untouched)."""
        head = self.model.cluster_head
        if not hasattr(head, "init_centres") or bool(head.initialised):
            return
        feats, _, _ = self._features(train_mode=True)
        head.init_centres(feats, seed=self.config.seed)
        distributed.broadcast_state(head)  # every rank starts from rank 0's centres
        self.logger.log("init_centres", n=len(feats))

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to config.epochs (from the resumed position), evaluate, write outputs. On
        failure, a fresh run without a checkpoint leaves its directory empty (see `_abandon`);
        the run directory's lock is released when fit returns or raises."""
        try:
            metrics = self._fit()
        except BaseException:
            self._abandon()
            raise
        self.close()
        return metrics

    def _fit(self) -> dict[str, Any]:
        c, main = self.config, self.runtime.is_main_process
        wall_start = time.perf_counter()
        self.logger.log(
            "start",
            resumed=self.resume_state is not None,
            epoch=self.epoch,
            batch=self.batch,
            step=self.step,
            device=str(self.runtime.device),
            optimizer=optimizer_description(self.optimizer),
            loader_backend=getattr(self.train_loader, "backend", None),
            amp=str(self.amp_dtype),
            steps_per_epoch=self.steps_per_epoch,
        )
        progress = make_progress(
            main and c.progress, c.epochs * self.steps_per_epoch, c.epochs, self.step, c.batch_size
        )
        with value_checks(False):  # the finite-loss guard below replaces the per-input syncs
            while self.epoch < c.epochs:
                if self.epoch >= c.centre_warmup_epochs:
                    self.init_centres()
                batches = self.train_loader.epoch(self.epoch, start_batch=self.batch)
                while True:
                    # The loader may draw from torch's global RNG (DataLoader seeds its workers
                    # from it when an iterator starts); fencing it off keeps the stream the
                    # model uses (Gumbel noise) identical in resumed and uninterrupted runs.
                    with torch.random.fork_rng(devices=[]):
                        batch = next(batches, None)
                    if batch is None:
                        break
                    t0 = time.perf_counter()
                    record = self.train_step(batch)
                    dt = time.perf_counter() - t0
                    n = batch["a"].shape[0] * self.runtime.world_size
                    self.train_seconds += dt
                    self.images_seen += n
                    self.batch += 1
                    self.step += 1
                    record.update(epoch=self.epoch, images_per_s=n / dt)
                    if "skipped" in record:  # always logged; NaN/inf written as strings
                        self.logger.log(
                            "skipped_step",
                            step=self.step,
                            epoch=self.epoch,
                            reason=record["skipped"],
                            skipped=self.skipped_steps,
                            limit=c.skip_nonfinite_steps,
                        )
                    elif self.step % c.log_every == 0:
                        self.logger.scalars("step", self.step, **record)
                    if progress is not None:
                        progress.update(self.epoch, self.step, record["loss"], n)
                    if (
                        c.checkpoint_every
                        and self.step % c.checkpoint_every == 0
                        and self.batch < self.steps_per_epoch
                    ):
                        self.save()
                self.epoch, self.batch = self.epoch + 1, 0
                if c.eval_every and self.epoch % c.eval_every == 0 and self.epoch < c.epochs:
                    metrics, *_ = self.evaluate()
                    self.logger.scalars("eval", self.step, epoch=self.epoch, **_flat(metrics))
                self.save()
        if progress is not None:
            progress.close()
        metrics, feats, pred, labels = self.evaluate()
        metrics["timing"] = {
            "train_seconds": self.train_seconds,
            "images_per_second": self.images_seen / max(self.train_seconds, 1e-9),
            "wall_seconds_this_session": time.perf_counter() - wall_start,
        }
        metrics.update(
            method=c.method,
            dataset=c.dataset,
            epochs=c.epochs,
            steps=self.step,
            num_clusters=c.num_clusters,
            backbone=c.backbone,
        )
        if main:
            self.logger.scalars("eval", self.step, epoch=self.epoch, **_flat(metrics))
            self._claim("metrics.json", *(("plots",) if c.plots else ()))
            write_text(self.out / "metrics.json", json.dumps(metrics, indent=2))
            if c.plots:
                self.write_plots(feats, pred, labels)
        self.logger.log("end", **_flat(metrics))
        self.logger.close()
        return metrics

    def write_plots(self, feats: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> None:
        from .plots import plot_confusion, plot_embedding, plot_losses

        plots = self.out / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        steps = last_per_step(read_log(self.out / "log.jsonl", "step"))
        if steps:
            plot_losses(steps, plots / "losses.png")
        plot_confusion(labels, pred, plots / "confusion.png")
        plot_embedding(feats, pred, plots / "embedding.png", seed=self.config.seed)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"kmeans": {"nmi": x}} -> {"kmeans_nmi": x}, for JSONL records and TensorBoard tags."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(
    config: TrainConfig,
    dataset=None,
    runtime: Runtime | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Build a Trainer and run it; returns the final metrics (also in out/metrics.json)."""
    return Trainer(config, dataset, runtime, resume_from).fit()
