"""The autograd shared by the fused backends: `pairs` makes a forward / backward pair of
torch.library ops differentiable (and refuses double backward), `nt_xent` is NT-Xent's one
autograd path (fast path, row primitives, gathered rows), `nt_xent_bank` the memory bank's."""
