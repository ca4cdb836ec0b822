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
# The runs behind each row: docs/methods.md, "Presets".
PRESETS: dict[tuple[str, str], dict] = {
    # digits: best NMI over seeds 0-4 on the 2-core CPU
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
    # mnist5k: epochs sized to a 10-minute run on 2 CPU cores
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
