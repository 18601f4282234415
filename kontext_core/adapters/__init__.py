"""LoRAs: reading every FLUX layout, applying them merged or on the fly, and their wide-K form on fp8 layers."""
