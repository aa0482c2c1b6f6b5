"""Triton kernels for the GPU paths (imported only where triton is installed)."""
