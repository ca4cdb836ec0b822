"""A core install (torch, numpy, triton; no [train] extra) imports fastcluster_cl, runs every
loss and `fastcluster-cl info`, and refuses `train` with a one-line hint at the extra."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter whose import system refuses the [train] extra's modules (and the
# other optional ones), recording every attempt to import them.
SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    import torch  # before the block: torch itself probes tqdm (torch.hub) and tolerates it
    import torch._dynamo  # custom ops load it on first call; it probes many modules' specs

    BLOCKED = {"torchvision", "sklearn", "scipy", "matplotlib", "tqdm", "tensorboard", "PIL",
               "mlxtend", "lightly", "pytorch_metric_learning", "nvidia"}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"blocked: {name}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import fastcluster_cl as fc
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    c_a = torch.randn(6, 3, generator=g, requires_grad=True)
    c_b = torch.randn(6, 3, generator=g)
    h = torch.randn(6, 4, generator=g)
    for backend in ("torch", "chunked", "auto"):
        q = fc.student_t(h, torch.randn(3, 4, generator=g), backend=backend)
        p_a, p_b = torch.softmax(c_a, 1), torch.softmax(c_b, 1)
        losses = [fc.nt_xent(z_a, z_b, backend=backend),
                  fc.cc_cluster_loss(c_a, c_b, backend=backend),
                  fc.dec_loss(q, backend=backend),
                  fc.anchor_loss(q, p_a, p_b, backend=backend)]
        for method, inputs in (("anchor", dict(q0=q, q_a=p_a, q_b=p_b)),
                               ("cc", dict(logits_a=c_a, logits_b=c_b)),
                               ("tcc", dict(logits_a=c_a, logits_b=c_b, centers=z_a[:3],
                                            r_a=z_a, r_b=z_b))):
            crit = fc.ClusterContrastiveLoss(method, backend=backend)
            losses.append(crit(z_a, z_b, **inputs).total)
        sum(losses).backward()
        assert all(torch.isfinite(x) for x in losses), losses
    assert not attempts, f"the losses imported optional modules: {sorted(set(attempts))}"

    from fastcluster_cl.cli import main  # info probes the optional modules, which is fine
    assert main(["info"]) == 0
    assert main(["train", "--epochs", "1"]) == 1
    print("core ok")
""")


def test_core_install_runs_every_loss_without_the_train_extra():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout
    assert "pip install 'fastcluster_cl[train]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
