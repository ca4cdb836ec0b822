"""Command line: ``fastcluster-cl train | eval | bench | info``.

Exit codes: 0 success; 2 bad arguments (argparse, and settings the dataset, backbone or
checkpoint make impossible, found before the first step), naming the option; 1 a run that cannot
proceed (missing dataset, unreadable, corrupted or incompatible checkpoint, busy, foreign or
unwritable run directory, full disk, non-finite loss or gradient); 130 SIGINT, 143 SIGTERM. Each
is reported as one line on stderr (set FASTCLUSTER_CL_TRACEBACK=1 to get the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
PROG = "fastcluster-cl"
# Top-level modules of the [train] extra, which `train` and `eval` need (the losses do not).
TRAIN_MODULES = ("torchvision", "sklearn", "scipy", "matplotlib", "tqdm", "tensorboard")


def missing_train_modules() -> list[str]:
    """The [train] extra's modules that cannot be imported here (checked without importing)."""
    from ._compat import module_available

    return [name for name in TRAIN_MODULES if not module_available(name)]


# The largest accepted numbers: settings become float32 / int32 values in torch (a larger lr
# overflows in the optimizer), and numpy's seeds are 32-bit.
MAX_FLOAT, MAX_INT, MAX_SEED = 3.4028234663852886e38, 2**31 - 1, 2**32 - 1


def _number(cast, minimum, strict: bool, maximum=None):
    """argparse type: `cast` the text and require > minimum (strict) or >= minimum, and
    <= maximum (default: MAX_INT or MAX_FLOAT)."""
    maximum = maximum if maximum is not None else MAX_INT if cast is int else MAX_FLOAT

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value != value:
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text}"
            )
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value > maximum:
            limit = maximum if cast is int else f"{maximum:g}"
            raise argparse.ArgumentTypeError(f"must be <= {limit}, got {text}")
        return value

    return parse


POS_INT, NONNEG_INT = _number(int, 0, True), _number(int, 0, False)
POS_FLOAT, NONNEG_FLOAT = _number(float, 0, True), _number(float, 0, False)
SEED = _number(int, 0, False, maximum=MAX_SEED)


def _train_options(p: argparse.ArgumentParser) -> None:
    """Options of `train`. Defaults are SUPPRESSed so a resume can tell what was given."""
    from .models import BACKBONES, METHOD_HEADS
    from .train.config import AMP_MODES, TrainConfig
    from .train.optim import OPTIMIZERS

    d = TrainConfig()
    S = argparse.SUPPRESS
    p.add_argument("--dataset", default=S, help=f"dataset name (default {d.dataset})")
    p.add_argument(
        "--data-root",
        dest="data_root",
        default=S,
        help="directory holding the dataset files (on-disk datasets)",
    )
    p.add_argument(
        "--method",
        choices=tuple(METHOD_HEADS),
        default=S,
        help=f"clustering method (default {d.method})",
    )
    p.add_argument(
        "--backbone",
        choices=("auto",) + BACKBONES,
        default=S,
        help="feature extractor (default: the method's and dataset's preset, else by image size)",
    )
    p.add_argument(
        "--cifar-stem",
        dest="cifar_stem",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="ResNet 3x3 stem without max-pool (default: for <= 64 px)",
    )
    p.add_argument(
        "--num-clusters",
        dest="num_clusters",
        type=_number(int, 2, False),
        default=S,
        help="K (default: the number of classes)",
    )
    p.add_argument("--image-size", dest="image_size", type=POS_INT, default=S)
    p.add_argument("--augment", default=S, help="augmentation preset (default auto)")
    p.add_argument("--epochs", type=POS_INT, default=S, help="default: preset")
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=_number(int, 2, False),
        default=S,
        help=f"global batch, split over torchrun's ranks (default {d.batch_size})",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=f"default {d.optimizer}")
    p.add_argument("--lr", type=POS_FLOAT, default=S, help="default: preset")
    p.add_argument("--weight-decay", dest="weight_decay", type=NONNEG_FLOAT, default=S)
    p.add_argument(
        "--warmup-epochs",
        dest="warmup_epochs",
        type=NONNEG_FLOAT,
        default=S,
        help="linear lr warm-up before the cosine decay (default: preset)",
    )
    p.add_argument(
        "--grad-clip",
        dest="grad_clip",
        type=NONNEG_FLOAT,
        default=S,
        help="max gradient norm (0: off)",
    )
    p.add_argument(
        "--skip-nonfinite-steps",
        dest="skip_nonfinite_steps",
        type=NONNEG_INT,
        default=S,
        help="skip (no update) up to N steps whose loss or gradient is "
        "NaN/inf, each logged in log.jsonl, before stopping (default 0: stop at the "
        "first)",
    )
    p.add_argument(
        "--center-warmup-epochs",
        dest="center_warmup_epochs",
        type=NONNEG_INT,
        default=S,
        help="anchor: train the instance loss alone for this many epochs, "
        "then initialise the centers by k-means (default: epochs // 8)",
    )
    p.add_argument("--instance-temperature", dest="instance_temperature", type=POS_FLOAT, default=S)
    p.add_argument("--cluster-temperature", dest="cluster_temperature", type=POS_FLOAT, default=S)
    p.add_argument(
        "--gumbel-temperature",
        dest="gumbel_temperature",
        type=POS_FLOAT,
        default=S,
        help="tcc: temperature lambda of the Gumbel-softmax assignment samples and of "
        "q = softmax(cosine logits / lambda) (default: preset, 0.3 as TCC)",
    )
    p.add_argument(
        "--tcc-prior",
        dest="tcc_prior",
        choices=("kl", "marginal"),
        default=S,
        help="tcc: the ELBO's KL(q_i || uniform) per sample (kl) or CC's marginal "
        "entropy (marginal) (default: preset; marginal on digits and mnist5k)",
    )
    p.add_argument(
        "--loss-backend",
        dest="loss_backend",
        default=S,
        choices=("auto", "torch", "chunked", "triton", "cuda"),
    )
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=S,
        help="autocast dtype (default auto: bf16 on CUDA, none on the CPU)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="torch.compile the model and the loss",
    )
    p.add_argument("--seed", type=SEED, default=S, help=f"0 to {MAX_SEED} (default {d.seed})")
    p.add_argument(
        "--device",
        default=S,
        help="auto, cpu, cuda, cuda:1, ... (under torchrun: "
        "the device type; each rank takes cuda:LOCAL_RANK)",
    )
    p.add_argument(
        "--sync-bn",
        dest="sync_bn",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="SyncBatchNorm across torchrun's ranks (CUDA only)",
    )
    p.add_argument(
        "--threads",
        type=POS_INT,
        default=S,
        help="CPU threads for torch (default: one per core; on a shared machine 1 is often faster)",
    )
    p.add_argument(
        "--eval-every",
        dest="eval_every",
        type=NONNEG_INT,
        default=S,
        help="epochs between evaluations (0: at the end only)",
    )
    p.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every",
        type=NONNEG_INT,
        default=S,
        help="steps between mid-epoch checkpoints (0: at epoch ends only)",
    )
    p.add_argument("--log-every", dest="log_every", type=POS_INT, default=S)
    p.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="write PNG plots at the end (default on)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="progress bar on a terminal (default on)",
    )
    p.add_argument(
        "--out",
        default=S,
        help="output directory (default runs/<timestamp>; on --resume, the checkpoint's directory)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint file or run directory",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The full parser; `with_bench=False` leaves fastcluster_cl.bench unimported (its options
    are then not registered), which `main` uses for every other command."""
    parser = _Parser(prog=PROG, description="Deep contrastive image clustering.")
    sub = parser.add_subparsers(
        dest="command", metavar="{train,eval,bench,info}", parser_class=_Parser
    )
    sub.required = True
    train = sub.add_parser("train", help="train a clustering model")
    if not missing_train_modules():  # else `main` refuses train before parsing
        _train_options(train)
    ev = sub.add_parser("eval", help="evaluate a checkpoint (NMI/ACC/ARI, k-means on features)")
    ev.add_argument("checkpoint", help="checkpoint file or run directory")
    ev.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    ev.add_argument("--data-root", dest="data_root", default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", dest="batch_size", type=POS_INT, default=512)
    ev.add_argument("--out", default=None, help="also write the metrics to OUT/metrics.json")
    bench = sub.add_parser("bench", help="run the benchmarks (fastcluster_cl.bench)")
    bench_module = None
    if with_bench:
        try:
            from .bench import runner as bench_module
        except ImportError:
            pass
    if bench_module is not None:
        bench_module.add_arguments(bench)
    else:
        bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sub.add_parser("info", help="versions, devices and available backends")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .train.checkpoint import load_checkpoint, resolve_checkpoint
    from .train.config import TrainConfig
    from .train.loop import train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    if args.resume is not None:
        path = resolve_checkpoint(args.resume)
        saved = load_checkpoint(path)["config"]
        config = _saved_config(path, saved, {"out": str(path.parent), **given})
    else:
        config = TrainConfig.from_dict(given)
        config.check()
    try:
        metrics = train(config, resume_from=args.resume)
        main = distributed.is_main_process()
    finally:
        distributed.cleanup()
    if main:  # under torchrun, one summary line, not one per rank
        print(
            json.dumps(
                {k: metrics[k] for k in ("nmi", "acc", "ari")}
                | {
                    "kmeans": metrics["kmeans"],
                    "kmeans_l2": metrics["kmeans_l2"],
                    "seconds": metrics["timing"]["train_seconds"],
                }
            )
        )
    return EXIT_OK


def _saved_config(path, saved: dict, overrides: dict):
    """A TrainConfig from a checkpoint's settings with `overrides` (the command line's) applied.
    The checkpoint's own settings are checked first, every one of them, so that an override
    cannot hide a bad stored value; a setting of the wrong type or value is a CheckpointError
    naming the checkpoint."""
    from .train.checkpoint import CheckpointError
    from .train.config import TrainConfig

    try:
        TrainConfig.from_dict(saved).check()
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} holds settings this version cannot use: {err}"
        ) from err
    config = TrainConfig.from_dict({**saved, **overrides})
    config.check()
    return config


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.rundir import RunDir

    # --out is taken (new, empty, or ours with metrics.json free or ours) before any work
    out = RunDir(args.out).open_output(("metrics.json",), "eval") if args.out else None
    try:
        metrics = _evaluate(args)
        if out is not None:
            from .train.logging import write_text

            write_text(out.path / "metrics.json", json.dumps(metrics, indent=2))
    except BaseException:
        if out is not None and (out.created or out.marked_here):  # marked for nothing: undo
            out.discard()
        raise
    finally:
        if out is not None:
            out.release()
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> dict:
    """The metrics of `args.checkpoint` (printed as JSON)."""
    from .train.checkpoint import load_checkpoint, resolve_checkpoint
    from .train.loop import Trainer
    from .train.runtime import Runtime

    path = resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    overrides = {"device": args.device, "eval_batch_size": args.batch_size, "plots": False}
    if args.dataset is not None:
        overrides["dataset"] = args.dataset
    if args.data_root is not None:
        overrides["data_root"] = args.data_root
    trainer = Trainer.for_evaluation(
        _saved_config(path, state["config"], overrides), state, Runtime.create(args.device)
    )
    metrics, *_ = trainer.evaluate()
    print(json.dumps(metrics, indent=2))
    return metrics


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from .bench import runner as bench
    except ImportError as err:
        raise RuntimeError(
            f"the benchmark module fastcluster_cl.bench is not available "
            f"({err}); install the package with its benchmarks"
        ) from err
    return int(bench.run(args))


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(info(), indent=2))
    return EXIT_OK


def info() -> dict:
    """Versions, devices, and which optional components can be used here."""
    import platform

    import torch

    from . import __version__
    from ._compat import apex_available, module_available
    from .backends.dispatch import BACKENDS, implementation

    def version(name):
        try:
            module = __import__(name)
            return getattr(module, "__version__", "installed")
        except Exception as err:  # a broken optional install is reported, not fatal
            return f"unavailable ({type(err).__name__})"

    devices = ["cpu"] + [
        f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
    ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {}
    for name in BACKENDS[1:]:
        try:
            implementation("nt_xent", name, device)
            backends[name] = "available"
        except (RuntimeError, NotImplementedError, ImportError) as err:
            backends[name] = f"unavailable: {str(err).splitlines()[0]}"
    return {
        "fastcluster_cl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": version("torchvision"),
        "triton": version("triton"),
        "devices": devices,
        "loss_backends_on_" + device.type: backends,
        "dali": version("nvidia.dali") if module_available("nvidia.dali") else "not installed",
        "apex_fused_optimizers": apex_available(),
    }


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info}


def _one_line(err: BaseException) -> str:
    """The error as one line: an OSError as "what: file", other errors' lines joined."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        if err.filename is not None and str(err.filename) not in text:
            text += f": {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    missing = missing_train_modules()
    if command in ("train", "eval") and missing:
        print(
            f"{PROG} {command}: error: needs the training extra (missing "
            f"{', '.join(missing)}); pip install 'fastcluster_cl[train]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    parser = build_parser(with_bench="bench" in argv)
    args = parser.parse_args(argv)
    errors: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError)
    usage_errors: tuple[type[Exception], ...] = ()
    if args.command in ("train", "eval"):
        from .train.checkpoint import CheckpointError
        from .train.config import ConfigError
        from .train.loop import NonFiniteLossError

        errors += (CheckpointError, NonFiniteLossError)
        usage_errors += (ConfigError,)
    previous = _raise_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except usage_errors + errors as err:
        if os.environ.get("FASTCLUSTER_CL_TRACEBACK"):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, usage_errors) else EXIT_ERROR
    except KeyboardInterrupt as err:
        print(
            f"{PROG}: interrupted{' (SIGTERM)' if isinstance(err, Terminated) else ''}",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that clean-ups run as for Ctrl-C (a
    checkpoint write removes its temporary file, a failed start its files)."""


def _raise_on_sigterm():
    """Turn SIGTERM into `Terminated` (main thread only); returns the previous handler."""

    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test's thread)
        return None


if __name__ == "__main__":
    sys.exit(main())
