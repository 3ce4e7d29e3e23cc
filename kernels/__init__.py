"""Hand-written Triton kernels, each beside a PyTorch reference of the same signature.

Installed as `minivid.kernels`. Triton is imported lazily, only when a kernel runs on CUDA.
"""
