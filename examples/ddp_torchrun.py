"""Plain DDP under torchrun with fastcluster_cl's NT-Xent over every rank's batch
(`gather_distributed=True`: each rank contrasts its rows against the all-gathered batch, and
DDP's gradient averaging then gives exactly the one-process gradient of the whole batch).

    torchrun --standalone --nproc_per_node=8 examples/ddp_torchrun.py          # 8 GPUs
    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py --tiny   # CPU, gloo
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastcluster_cl as fc


def train(tiny: bool, device: torch.device, cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(
        nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128)).to(device),
        device_ids=[device.index] if cuda else None,
    )
    criterion = fc.NTXentLoss(temperature=0.2, gather_distributed=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own share of the batch

    for step in range(3 if tiny else 1000):
        x = torch.randn(32, 64, generator=data).to(device)
        view_a, view_b = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
        loss = criterion(model(view_a), model(view_b))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (tiny or step % 100 == 0):
            print(f"step {step}: loss {loss.item():.4f} over {world} ranks", flush=True)


def main(tiny: bool) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    train(tiny, device, cuda)
    # DDP holds the process group: collect it (and its pending gloo work) while the interpreter
    # is whole, wait for every rank, then tear the group down
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="three steps")
    main(parser.parse_args().tiny)
