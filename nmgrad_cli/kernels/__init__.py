"""Fast implementations of the reference methods in :mod:`nmgrad_cli.methods`.

- :mod:`.cpu_fused`: the 1:2 and 2:4 methods written column by column and fused by
  ``torch.compile`` into one pass on the CPU.
- :mod:`.triton_prune`: Triton kernels for the GPU (and the Triton interpreter on the CPU).

Each computes the same function of the same uniforms as the reference; tests compare them.
"""
