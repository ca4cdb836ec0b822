"""Triton kernels (installed as fastcluster_cl.kernels): one file per fused op."""
