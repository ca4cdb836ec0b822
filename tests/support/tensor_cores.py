"""bf16 x bf16 -> fp32 products (`numerics.parts_product`, `parts_gram`) without a GPU."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

AT = torch.ops.aten


class EmulatedTensorCores(TorchDispatchMode):
    """aten.mm.dtype / addmm.dtype (CUDA only in torch) on the CPU: the bf16 operands upcast to
    the output dtype first."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is AT.mm.dtype:
            a, b, dtype = args
            return torch.mm(a.to(dtype), b.to(dtype))
        if func is AT.addmm.dtype:
            c, a, b, dtype = args
            return torch.addmm(c, a.to(dtype), b.to(dtype), **kwargs)
        return func(*args, **kwargs)
