"""Fast implementations of the reference methods in :mod:`nmgrad_cli.methods`.

- :mod:`.cpu_fused`: the 1:2 and 2:4 methods written column by column and fused by
  ``torch.compile`` into one pass on the CPU.
- :mod:`.triton_prune`: Triton kernels for the GPU (and the Triton interpreter on the CPU).

Each computes the same function of the same uniforms as the reference; tests compare them.
"""


def sample_blocks(blocks, u, method, n: int, backend: str):
    """``backend``'s draw (reference, fused or triton) of a registered ``method`` on blocks (K, M)
    with uniforms (K, U): the same function of the same uniforms on every backend."""
    if backend == "fused":
        from .cpu_fused import fused_sample

        return fused_sample(blocks, u, method.name, n)
    if backend == "triton":
        from .triton_prune import triton_sample_blocks

        return triton_sample_blocks(blocks, u, method.name, n)
    return method.sample(blocks, n, u)
