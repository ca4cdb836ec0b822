// torch.utils.cpp_extension binding of the CUDA twin (fastcluster_cl.backends.cuda builds it).
//
// Each <op>_binding.cpp (beside csrc/<op>.cu) checks its tensors, allocates the outputs and calls
// the extern "C" launchers of fcl_kernels.h on the current stream. fastcluster_cl/backends/cuda/ registers them as
// torch.library ops; NT-Xent's one autograd.Function is fastcluster_cl/backends/autograd/nt_xent.py
// and the cluster ops' autograd is registered on their ops (docs/ops.md). The row-range functions
// are also the building blocks of the distributed path (each rank: its rows against the
// all-gathered Z and lse).
#include "binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ twin of the fastcluster_cl fused NT-Xent (see csrc/fcl_kernels.h)";
  bind_nt_xent(m);
  bind_cluster(m);
  bind_nt_xent_bank(m);
  bind_objective(m);
}
