"""Per-method, per-dataset training presets: what `fastcluster-cl train --method M --dataset D`
uses for every setting the user leaves out.

Each entry was chosen by measurement on this project's 2-core CPU machine (docs/results.md;
docs/methods.md has the runs behind them). Datasets without an entry of their own use
the "*" row of their method: the published settings (CC, arXiv 2109.12714, TCC's prototype,
scaled to what a GPU run of a few hundred epochs needs) untested here.

Columns: backbone ("auto": small_cnn below 32 px, resnet18 up to 64 px, else resnet34),
image_size (None: the dataset's native size), epochs, lr (Adam), warmup_epochs (linear lr
warm-up, then cosine), instance_temperature, cluster_temperature, gumbel_temperature (TCC's
lambda), tcc_prior (TCC's entropy term: "kl" per sample or CC's "marginal"),
center_warmup_epochs (anchor: instance loss alone before the k-means initialisation of the
centers; None: epochs // 8), loss_weights (ClusterContrastiveLoss weights; used when the
run gives none).
"""

from __future__ import annotations

PRESET_KEYS = (
    "backbone",
    "image_size",
    "epochs",
    "lr",
    "warmup_epochs",
    "instance_temperature",
    "cluster_temperature",
    "gumbel_temperature",
    "tcc_prior",
    "center_warmup_epochs",
    "loss_weights",
)

_BASE = {
    "backbone": "auto",
    "image_size": None,
    "epochs": 80,
    "lr": 1e-3,
    "warmup_epochs": 2.0,
    "instance_temperature": 0.5,
    "cluster_temperature": 1.0,
    "gumbel_temperature": 0.3,
    "tcc_prior": "kl",
    "center_warmup_epochs": None,
    "loss_weights": {},
}

# (method, dataset) -> overrides of _BASE. center_warmup_epochs None: epochs // 8 (anchor).
PRESETS: dict[tuple[str, str], dict] = {
    # 8 x 8 sklearn digits (1797 images); seeds 0-4 at one thread in docs/results.md. Runs at seed 0
    # (one thread) unless said; "with morph" were taken with mnist5k's augmentation, whose
    # stroke dilation / erosion the digits' own (DIGIT_8PX) leaves out.
    # cc: with morph: digit_cnn 150 epochs .903 NMI (small_cnn 80: .747, digit_cnn 80: .815);
    # 200 epochs, cluster temperature .5 over 1.0 on every seed (mean .881 against .859).
    # Without morph: seeds 0-4 .940 / .854 / .948 / .939 / .952 (mean .927); instance
    # temperature .3: .945 / .951 / .925 / .938 / .950 (mean .942, min .925).
    # anchor: with morph 200 epochs (seeds 0-4 mean .9006, min .854; 150: .903 / .858);
    # without: .940 / .937 / .943 / .946 / .946, mean .943 (instance temperature .3, seed 0:
    # .942).
    # tcc: the plain NT-Xent on z ("feature") is what keeps its features useful (.178 without
    # it, .751 with it at 80 epochs); with morph, at 150 epochs, CC's marginal prior instead
    # of the per-sample KL .806 (KL .746, no prior .791, feature weight .5 .637), with cluster
    # temperature .5 .829, and prior weight 2 .885 (seeds 0-4 mean .836; weight 3: .890 but
    # seeds 1-2 .798 / .773; weight 4: .787). Without morph: seeds 0-2 .899 / .919 / .892;
    # seeds 0 and 2: 200 epochs .905 / .865, prior weight 1 .860 / .838, weight 3 .883 / .898,
    # instance temperature .2 .887 / .810, .3 .924 / .907 (seeds 0-4 mean .919, min .907).
    ("anchor", "digits"): {"backbone": "digit_cnn", "epochs": 200},
    ("cc", "digits"): {
        "backbone": "digit_cnn",
        "epochs": 200,
        "cluster_temperature": 0.5,
        "instance_temperature": 0.3,
    },
    ("tcc", "digits"): {
        "backbone": "digit_cnn",
        "epochs": 150,
        "tcc_prior": "marginal",
        "instance_temperature": 0.3,
        "cluster_temperature": 0.5,
        "loss_weights": {"feature": 1.0, "prior": 2.0},
    },
    # mnist5k: 5000 MNIST images at the native 28 px; epochs sized to the 10-minute budget on
    # 2 cores (cc, eval every 20 epochs: .926 at 20, .939 at 60, .944 at 100, .955 at 140;
    # 140 epochs .954 in 611 s of wall at 2 threads, 93 s of it the CPU augmentation, 130
    # .949 in 633 s, 115 .949 in 538 s);
    # anchor runs 3 views a step (40 epochs: .937 in 240 s of wall; 70: .953 in 434 s).
    # Instance temperature .3 (one thread): anchor .939, cc .939, under the .5 presets' .953 /
    # .949 at two threads (no one-thread .5 run to set beside them); so .5 here.
    ("anchor", "mnist5k"): {"backbone": "digit_cnn", "epochs": 70, "center_warmup_epochs": 10},
    ("cc", "mnist5k"): {"backbone": "digit_cnn", "epochs": 115},
    ("tcc", "mnist5k"): {
        "backbone": "digit_cnn",
        "epochs": 100,
        "tcc_prior": "marginal",
        "cluster_temperature": 0.5,
        "loss_weights": {"feature": 1.0, "prior": 2.0},
    },
    # other datasets: the published schedules' settings, shortened (GPU runs)
    ("anchor", "*"): {"lr": 3e-4, "epochs": 500, "warmup_epochs": 0.0, "center_warmup_epochs": 0},
    ("cc", "*"): {"lr": 3e-4, "epochs": 500, "warmup_epochs": 0.0},
    ("tcc", "*"): {"lr": 1e-3, "epochs": 500, "loss_weights": {"feature": 1.0}},
}


def preset(method: str, dataset: str) -> dict:
    """The full preset of (method, dataset): every key of PRESET_KEYS."""
    out = {**_BASE, **PRESETS.get((method, dataset), PRESETS.get((method, "*"), {}))}
    out["loss_weights"] = dict(out["loss_weights"])
    return out


def preset_table() -> str:
    """PRESETS as a Markdown table (for docs and `--help`)."""
    head = "| method | dataset | " + " | ".join(PRESET_KEYS) + " |"
    rows = [head, "|" + "---|" * (len(PRESET_KEYS) + 2)]
    for method, dataset in PRESETS:
        p = preset(method, dataset)
        rows.append(
            f"| {method} | {dataset} | " + " | ".join(str(p[k]) for k in PRESET_KEYS) + " |"
        )
    return "\n".join(rows)
