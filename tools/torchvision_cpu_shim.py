"""Make `import torchvision` work first, before fastcluster_cl, in the CPU environment that the
README and CI install (a CPU-only torch beside the registry's torchvision, a CUDA build).

Root cause: that torchvision's compiled ops (libtorchvision, linked to libtorch_cuda) cannot load
beside a CPU-only torch, so `torchvision::nms` is never defined and torchvision's import fails at
its fake-kernel registration with "operator torchvision::nms does not exist". fastcluster_cl
defines the two schemas torchvision looks up (`fastcluster_cl._compat`), but only once it is
imported; lightly or a script that imports torchvision first still failed.

`python tools/torchvision_cpu_shim.py` installs, into the running interpreter's site-packages, a
`.pth` file whose one line adds an import hook: the first `import torchvision` (by anyone) first
imports fastcluster_cl, which declares the schemas when torch has no CUDA. Nothing else runs at
start-up. A matching torch / torchvision pair (a CUDA torch, or CPU builds of both) never needs
it: there the schemas exist and the shim does nothing. Remove it with `--uninstall`.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

NAME = "fastcluster_cl_torchvision_shim"


class _FirstTorchvisionImport(importlib.abc.MetaPathFinder):
    """On the first `import torchvision`: drop this hook, import fastcluster_cl (which defines
    torchvision's op schemas on a CPU-only torch), then let the normal import go on."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import fastcluster_cl  # noqa: F401
        except ImportError:
            pass
        return None


def activate() -> None:
    """Run by the .pth line at interpreter start-up: register the hook (cheap, imports nothing)."""
    if not any(isinstance(f, _FirstTorchvisionImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstTorchvisionImport())


def install(uninstall: bool = False) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    module, pth = site / f"{NAME}.py", site / f"{NAME}.pth"
    if uninstall:
        module.unlink(missing_ok=True)
        pth.unlink(missing_ok=True)
        return
    module.write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    pth.write_text(f"import {NAME}; {NAME}.activate()\n", encoding="utf-8")
    print(f"installed {pth}")


if __name__ == "__main__":
    install(uninstall="--uninstall" in sys.argv[1:])
