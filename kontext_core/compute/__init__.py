"""How the blocks compute: attention backends, the fused Triton ops with their PyTorch fallbacks, 8-bit weights and
their GEMMs, CUDA graphs, and one step split over several processes."""
