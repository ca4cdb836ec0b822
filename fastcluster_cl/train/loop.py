"""The training loop: two-view contrastive clustering with AMP, optional torch.compile, fused
optimizers, warmup + cosine schedule, gradient clipping, a non-finite-loss guard, periodic
evaluation, exact resume and JSONL/TensorBoard logs.

`Trainer` owns one run; `fit` reads top to bottom: per epoch the center initialisation, then per
batch data, forward/backward, step, log and checkpoint, then evaluation. Its neighbours hold the
rest: config.py (settings and checks), runtime.py (device, DDP, AMP), evaluate.py (features and
metrics), rundir.py (what the run may write), checkpoint.py, logging.py, plots.py. Logging,
checkpoints and plots happen only on the main process. Under torchrun (docs/distributed.md) the
model is wrapped in DistributedDataParallel, the losses gather across ranks and each rank reads
its shard: `batch_size` is the global batch, so a run (and its checkpoints) means the same thing
on any number of ranks.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..models import build_model, method_loss_inputs
from ..modules import ClusterContrastiveLoss, LossOutput, NTXentLoss
from ..validation import value_checks
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from .config import (
    ConfigError,
    TrainConfig,
    check_fits_dataset,
    check_resumable,
    check_threads,
    resolve,
)
from .evaluate import evaluate as evaluate_model
from .evaluate import extract_features, flat
from .logging import RunLogger, last_per_step, read_log, write_text
from .optim import build_optimizer, optimizer_description
from .progress import make_progress
from .rundir import CHECKPOINT_NAME, RunDir
from .runtime import MEMORY_FORMAT, Runtime, amp_dtype, model_input, seed_everything
from .schedule import warmup_cosine


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or inf; training stops instead of corrupting the
    weights."""


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
            gumbel_temperature=config.gumbel_temperature,
            backend=config.loss_backend,
            gather_distributed=self.runtime.world_size > 1,
            tcc_prior=config.tcc_prior,
            alpha=getattr(self.model.cluster_head, "alpha", 1.0),
        )
        self.ddp_model = distributed.wrap_model(
            self.model, dev, config.sync_bn, find_unused_parameters=config.center_warmup_epochs > 0
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
        return model_input(batch, keys, self.runtime.device)

    def _views(self, batch: dict, keys: tuple[str, ...]) -> list[torch.Tensor]:
        return [self._inputs(batch, (k,)) for k in keys]

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on a two-view (plus clean view for anchor) batch."""
        anchor = self.config.method == "anchor"
        # Before the centers are initialised (center warmup) only the instance loss trains.
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
    def _features(self, train_mode: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features h, cluster-head predictions, labels) of every clean image, in dataset
        order. train_mode: BatchNorm on batch statistics, as the loss sees it, so the images
        go in shuffled, class-mixed batches (the eval loader's batches follow the dataset's
        order: one class per batch for a dataset stored sorted by class) of the global batch
        size, the same on every rank and for any number of ranks, so the features, and the
        centers initialised from them, do not depend on the world size (under sync_bn these
        are exactly the training statistics; without it each rank's loss sees its share)."""
        from ..data import make_eval_loader

        loader = self.eval_loader
        if train_mode:
            loader = make_eval_loader(
                self.dataset,
                self.config.batch_size,
                image_size=self.config.image_size,
                device=self.runtime.device,
                shuffle_seed=self.config.seed,
            )
        return extract_features(self.model, loader, self.runtime.device, self.amp_dtype, train_mode)

    def evaluate(self) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        """Cluster-head metrics (nmi, acc, ari) and k-means-on-features metrics."""
        c = self.config
        return evaluate_model(
            self.model,
            self.eval_loader,
            self.runtime.device,
            self.amp_dtype,
            c.num_clusters,
            c.seed,
        )

    def init_centers(self) -> None:
        """k-means on the features of the current network (BatchNorm in training mode, as the
        loss will see them; running statistics left untouched)."""
        head = self.model.cluster_head
        if not hasattr(head, "init_centers") or bool(head.initialised):
            return
        feats, _, _ = self._features(train_mode=True)
        head.init_centers(feats, seed=self.config.seed)
        distributed.broadcast_state(head)  # every rank starts from rank 0's centers
        self.logger.log("init_centers", n=len(feats))

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
        with value_checks(False):  # the finite-loss guard replaces the per-input syncs
            while self.epoch < c.epochs:
                # centers: k-means on the current features once the warm-up is over
                if self.epoch >= c.center_warmup_epochs:
                    self.init_centers()
                self._train_epoch(progress)
                self.epoch, self.batch = self.epoch + 1, 0
                # evaluate every eval_every epochs (the last one is evaluated below)
                if c.eval_every and self.epoch % c.eval_every == 0 and self.epoch < c.epochs:
                    metrics, *_ = self.evaluate()
                    self.logger.scalars("eval", self.step, epoch=self.epoch, **flat(metrics))
                self.save()
        if progress is not None:
            progress.close()
        return self._finish(wall_start)

    def _train_epoch(self, progress) -> None:
        """The batches of self.epoch from self.batch on: one optimizer step each."""
        c = self.config
        batches = self.train_loader.epoch(self.epoch, start_batch=self.batch)
        while True:
            # data: the loader may draw from torch's global RNG (DataLoader seeds its workers
            # from it when an iterator starts); fencing it off keeps the stream the model uses
            # (Gumbel noise) identical in resumed and uninterrupted runs
            with torch.random.fork_rng(devices=[]):
                batch = next(batches, None)
            if batch is None:
                return
            # forward, backward and optimizer step
            t0 = time.perf_counter()
            record = self.train_step(batch)
            dt = time.perf_counter() - t0
            n = batch["a"].shape[0] * self.runtime.world_size
            self.train_seconds += dt
            self.images_seen += n
            self.batch += 1
            self.step += 1
            # log: skipped steps always (NaN/inf written as strings), the others every log_every
            record.update(epoch=self.epoch, images_per_s=n / dt)
            if "skipped" in record:
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
            # checkpoint every checkpoint_every steps (the epoch's end saves anyway)
            if (
                c.checkpoint_every
                and self.step % c.checkpoint_every == 0
                and self.batch < self.steps_per_epoch
            ):
                self.save()

    def _finish(self, wall_start: float) -> dict[str, Any]:
        """The final evaluation, written as metrics.json (and plots) by the main process."""
        c = self.config
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
        if self.runtime.is_main_process:
            self.logger.scalars("eval", self.step, epoch=self.epoch, **flat(metrics))
            self._claim("metrics.json", *(("plots",) if c.plots else ()))
            write_text(self.out / "metrics.json", json.dumps(metrics, indent=2))
            if c.plots:
                self.write_plots(feats, pred, labels)
        self.logger.log("end", **flat(metrics))
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
