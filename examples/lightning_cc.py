"""Contrastive Clustering (Li et al., AAAI 2021) as a PyTorch Lightning module, with
fastcluster_cl's whole CC objective (instance NT-Xent + cluster contrast) in one call.

    python examples/lightning_cc.py              # the embedded digits, 100 epochs, NMI at the end
    python examples/lightning_cc.py --tiny       # one short epoch, seconds on a CPU
"""

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import fastcluster_cl as fc


def augment(x: torch.Tensor) -> torch.Tensor:
    """A random affine view of each 8 x 8 digit, plus noise."""
    theta = torch.eye(2, 3).repeat(len(x), 1, 1)
    theta[:, :, :2] += 0.15 * torch.randn(len(x), 2, 2)
    theta[:, :, 2] += 0.1 * torch.randn(len(x), 2)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False) + 0.05 * torch.randn_like(x)


class ContrastiveClustering(pl.LightningModule):
    def __init__(self, num_clusters: int = 10, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.instance_head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.cluster_head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_clusters))
        self.criterion = fc.ClusterContrastiveLoss(
            "cc", instance_temperature=0.5, cluster_temperature=1.0
        )

    def forward(self, x):
        h = self.backbone(x)
        return self.instance_head(h), self.cluster_head(h)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z_a, c_a = self(augment(x))
        z_b, c_b = self(augment(x))
        out = self.criterion(z_a, z_b, logits_a=c_a, logits_b=c_b)
        self.log_dict(
            {"loss": out.total, **{f"loss_{k}": v for k, v in out.parts.items()}}, prog_bar=True
        )
        return out.total

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(tiny: bool) -> None:
    pl.seed_everything(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images), batch_size=256, shuffle=True, drop_last=True
    )
    model = ContrastiveClustering()
    trainer = pl.Trainer(
        max_epochs=1 if tiny else 100,
        limit_train_batches=2 if tiny else None,
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not tiny,
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        clusters = model(images)[1].argmax(1).numpy()
    print(f"NMI of the cluster head: {normalized_mutual_info_score(digits.target, clusters):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run of two steps")
    main(parser.parse_args().tiny)
