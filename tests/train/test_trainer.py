"""The trainer end to end on a tiny synthetic dataset: outputs, evaluation, the non-finite
guard and resume checks."""

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from fastcluster_cl.data import ImageDataset
from fastcluster_cl.train.checkpoint import CheckpointError, load_checkpoint
from fastcluster_cl.train.config import TrainConfig, resolve
from fastcluster_cl.train.logging import read_log
from fastcluster_cl.train.loop import NonFiniteLossError, Trainer, train
from fastcluster_cl.train.rundir import RunDirError


def blobs(n_per_class=32, classes=3, seed=0) -> ImageDataset:
    """8x8 grey images: a distinct random template per class plus pixel noise. Named "digits"
    so the loaders use the digits augmentation preset."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (classes, 8, 8, 1))
    labels = np.repeat(np.arange(classes), n_per_class)
    noise = rng.normal(0, 12, (len(labels), 8, 8, 1))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return ImageDataset(images, labels, classes, "digits")


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(
        epochs=3,
        batch_size=32,
        hidden_dim=32,
        projection_dim=16,
        lr=3e-3,
        warmup_epochs=0.5,
        eval_every=1,
        eval_batch_size=64,
        out=str(tmp_path / "run"),
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_tiny_run_writes_every_output(tmp_path, method):
    torch.set_num_threads(1)
    cfg = tiny(tmp_path, method=method, plots=method == "anchor")
    metrics = train(cfg, dataset=blobs())
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["nmi"] == pytest.approx(metrics["nmi"]) and saved["method"] == method
    assert saved["steps"] == 9 and saved["timing"]["images_per_second"] > 0
    # three well-separated templates: features separate them after a few steps
    assert saved["kmeans"]["nmi"] > 0.9
    assert 0 <= saved["nmi"] <= 1 and 0 <= saved["acc"] <= 1
    log = out / "log.jsonl"
    steps = read_log(log, "step")
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in steps)
    assert {"loss_instance", "loss_cluster"} <= set(steps[0])
    assert [r["epoch"] for r in read_log(log, "eval")] == [1, 2, 3]
    state = load_checkpoint(out)
    assert state["position"] == {"epoch": 3, "batch": 0, "step": 9}
    # the digits preset's backbone
    assert state["config"]["in_channels"] == 1 and state["config"]["backbone"] == "digit_cnn"
    if method == "anchor":
        assert bool(state["model"]["cluster_head.initialised"])
        for png in ("losses.png", "confusion.png", "embedding.png"):
            assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
        assert list((out / "tensorboard").iterdir())
    evaluator = Trainer.for_evaluation(
        TrainConfig.from_dict(state["config"]), state, dataset=blobs()
    )
    again, *_ = evaluator.evaluate()
    assert again["nmi"] == pytest.approx(metrics["nmi"])


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_short_training_lowers_the_loss(tmp_path, method):
    """Smoke test per method (a few seconds): over 5 epochs of the tiny set the loss falls and
    every metric is finite."""
    torch.set_num_threads(1)
    cfg = tiny(
        tmp_path,
        method=method,
        epochs=5,
        plots=False,
        eval_every=0,
        **({"center_warmup_epochs": 0} if method == "anchor" else {}),
    )
    metrics = train(cfg, dataset=blobs())
    records = read_log(tmp_path / "run" / "log.jsonl", "step")
    # anchor: DEC's self-training target sharpens as the centers move, so its KL (and the total)
    # may rise while the model learns; its instance loss must fall
    key = "loss_instance" if method == "anchor" else "loss"
    losses = [r[key] for r in records]
    assert len(losses) == 15 and all(np.isfinite([r["loss"] for r in records]))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    for key in ("nmi", "acc", "ari"):
        assert np.isfinite(metrics[key]) and np.isfinite(metrics["kmeans"][key])


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    trainer = Trainer(tiny(tmp_path, method="cc", plots=False), dataset=blobs())
    with torch.no_grad():
        trainer.model.projector.net[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0 step 0 .*lower --lr"):
        trainer.fit()


def test_resume_refuses_a_different_model(tmp_path):
    train(tiny(tmp_path, epochs=1, plots=False), dataset=blobs())
    with pytest.raises(RunDirError, match="already holds a run; resume it with --resume"):
        Trainer(tiny(tmp_path, epochs=1), dataset=blobs())
    with pytest.raises(CheckpointError, match=r"hidden_dim=64 \(checkpoint: 32\)"):
        Trainer(
            tiny(tmp_path, epochs=1, hidden_dim=64), dataset=blobs(), resume_from=tmp_path / "run"
        )


@pytest.mark.parametrize("method", ["cc", "tcc", "anchor"])
def test_bf16_autocast_on_cpu(tmp_path, method):
    """Every method trains under bf16 autocast (bf16 projections and logits, fp32 parameters
    such as the centers)."""
    torch.set_num_threads(1)
    trainer = Trainer(
        tiny(tmp_path, method=method, amp="bf16", epochs=1, plots=False), dataset=blobs()
    )
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    metrics = trainer.fit()
    steps = read_log(tmp_path / "run" / "log.jsonl", "step")
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    assert trainer.model.projector.net[0].weight.dtype == torch.float32  # master weights
    assert 0 <= metrics["nmi"] <= 1


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    torch.set_num_threads(1)
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        train(
            tiny(
                tmp_path,
                method="cc",
                epochs=1,
                compile=compiled,
                plots=False,
                eval_every=0,
                out=str(out),
            ),
            dataset=blobs(),
        )
        losses[compiled] = [r["loss"] for r in read_log(out / "log.jsonl", "step")]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_center_warmup_trains_the_instance_loss_first(tmp_path):
    torch.set_num_threads(1)
    metrics = train(tiny(tmp_path, center_warmup_epochs=1, plots=False), dataset=blobs())
    log = tmp_path / "run" / "log.jsonl"
    steps = read_log(log, "step")
    assert all(set(r) & {"loss_cluster", "loss_anchor"} == set() for r in steps[:3])
    assert all({"loss_cluster", "loss_anchor"} <= set(r) for r in steps[3:])
    init = read_log(log, "init_centers")
    assert len(init) == 1 and init[0]["time"] > steps[2]["time"]
    evals = read_log(log, "eval")
    assert "nmi" not in evals[0] and "kmeans_nmi" in evals[0]  # centers not yet set
    assert "nmi" in evals[1] and 0 <= metrics["nmi"] <= 1
    with pytest.raises(ValueError, match="anchor method"):
        TrainConfig(method="cc", center_warmup_epochs=1).check()


def test_center_init_features_come_from_class_mixed_batches(tmp_path):
    """blobs() is stored sorted by class: in dataset order, batches of 32 hold one class each,
    and BatchNorm's batch statistics would erase what tells the classes apart before the
    k-means that places the centers."""
    torch.set_num_threads(1)
    data = blobs()
    trainer = Trainer(tiny(tmp_path, eval_batch_size=32), dataset=data)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    feats, _, labels = trainer._features(train_mode=True)
    np.testing.assert_array_equal(labels, data.labels)  # back in dataset order
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    found = KMeans(3, n_init=10, random_state=0).fit_predict(feats)
    assert normalized_mutual_info_score(labels, found) > 0.95


@pytest.mark.parametrize(
    "method, epochs, warmup, expected",
    [
        ("anchor", 80, None, 10),
        ("anchor", 7, None, 0),
        ("anchor", 80, 3, 3),
        ("cc", 80, None, 0),
        ("tcc", 80, None, 0),
    ],
)
def test_center_warmup_default_is_an_eighth_of_the_anchor_run(method, epochs, warmup, expected):
    config = TrainConfig(method=method, epochs=epochs, center_warmup_epochs=warmup)
    config.check()
    assert resolve(config, blobs()).center_warmup_epochs == expected


def nan_gradient_at(trainer, steps):
    """A hook that makes one parameter's gradient NaN at the given global steps; the loss
    stays finite."""
    weight = trainer.model.projector.net[0].weight
    return weight.register_hook(
        lambda g: torch.full_like(g, float("nan")) if trainer.step in steps else g
    )


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_nan_gradient_with_finite_loss_stops(tmp_path, grad_clip):
    torch.set_num_threads(1)
    trainer = Trainer(
        tiny(tmp_path, method="cc", plots=False, grad_clip=grad_clip), dataset=blobs()
    )
    nan_gradient_at(trainer, {1})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(
        NonFiniteLossError,
        match=r"gradient norm is nan \(the loss is finite\) "
        r"at epoch 0 step 1 \(loss=.*--skip-nonfinite-steps N",
    ):
        trainer.fit()
    assert trainer.step == 1  # step 0 updated, step 1 did not
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(
        torch.isfinite(v).all()
        for v in trainer.model.state_dict().values()
        if v.is_floating_point()
    )


def test_skip_nonfinite_steps_is_bounded_logged_and_resume_exact(tmp_path):
    torch.set_num_threads(1)
    bad = {1, 4}  # epoch 0 step 1, epoch 1 step 4

    def config(name, **kw):
        return tiny(
            tmp_path,
            method="cc",
            plots=False,
            epochs=2,
            eval_every=0,
            skip_nonfinite_steps=2,
            out=str(tmp_path / name),
            **kw,
        )

    full = Trainer(config("full"), dataset=blobs())
    nan_gradient_at(full, bad)
    full.fit()
    log = tmp_path / "full" / "log.jsonl"
    skipped = read_log(log, "skipped_step")
    assert [(r["step"], r["skipped"], r["limit"]) for r in skipped] == [(2, 1, 2), (5, 2, 2)]
    assert "gradient norm is nan" in skipped[0]["reason"]
    assert [r["step"] for r in read_log(log, "step")] == [1, 3, 4, 6]
    assert load_checkpoint(tmp_path / "full")["skipped_steps"] == 2

    # interrupted after epoch 0's checkpoint, then resumed: the same steps, weights and count
    part = Trainer(config("part"), dataset=blobs())
    nan_gradient_at(part, bad)

    class Stop(Exception):
        pass

    real_save = Trainer.save

    def save_then_stop(self):
        real_save(self)
        raise Stop

    part.save = save_then_stop.__get__(part)
    with pytest.raises(Stop):
        part.fit()
    assert load_checkpoint(tmp_path / "part")["skipped_steps"] == 1
    resumed = Trainer(config("part"), dataset=blobs(), resume_from=tmp_path / "part")
    nan_gradient_at(resumed, bad)
    resumed.fit()
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert b["skipped_steps"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [
        [(r["step"], r["loss"]) for r in read_log(tmp_path / n / "log.jsonl", "step")]
        for n in ("full", "part")
    ]
    assert losses[0] == sorted(set(losses[1]))

    # a third non-finite step with --skip-nonfinite-steps 2 stops the run, naming the limit
    third = Trainer(config("third"), dataset=blobs())
    nan_gradient_at(third, {0, 1, 2})
    with pytest.raises(
        NonFiniteLossError,
        match=r"2 such steps were skipped already "
        r"\(--skip-nonfinite-steps 2\)",
    ):
        third.fit()


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
@pytest.mark.parametrize("name", ["digits", "mnist5k", "cifar10"])
def test_presets_fill_what_the_user_leaves_out(method, name):
    from fastcluster_cl.train.presets import preset

    dataset = blobs()
    dataset.name = name  # resolve reads only the name, the classes and the image size
    resolved = resolve(TrainConfig(method=method, dataset=name), dataset)
    p = preset(method, name)
    for key in (
        "epochs",
        "lr",
        "warmup_epochs",
        "instance_temperature",
        "cluster_temperature",
        "gumbel_temperature",
        "loss_weights",
    ):
        assert getattr(resolved, key) == p[key], key
    if p["backbone"] != "auto":
        assert resolved.backbone == p["backbone"]
    given = resolve(
        TrainConfig(method=method, dataset=name, epochs=9, lr=0.5, backbone="small_cnn"), dataset
    )
    assert (given.epochs, given.lr, given.backbone) == (9, 0.5, "small_cnn")
