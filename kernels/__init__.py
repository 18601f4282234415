"""Optional fused Triton kernels, each beside a plain PyTorch reference (not yet written)."""
