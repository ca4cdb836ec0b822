"""Every implementation of the loss ops, by backend: `reference` (backend "torch", plain PyTorch,
the ground truth), `chunked` (the CPU path in tiles), `cuda` (the CUDA twin's glue; the Triton
backend is `fastcluster_cl.kernels`). `dispatch` maps a backend name to its module, `numerics`
holds what every backend shares, `autograd` the fused ops' autograd and `gathered` the
multi-process losses."""
