"""Where the models live: memory plans from free VRAM, block streaming from CPU memory, and the tiled AE."""
