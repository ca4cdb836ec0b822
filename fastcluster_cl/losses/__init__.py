"""Loss implementations by backend: `reference` (plain PyTorch, the ground truth), `chunked`
(row blocks, CPU fast path); `dispatch` maps a backend name to an implementation."""
