"""The networks themselves: configurations, layers, the Kontext transformer, the AE, and token packing with its
position ids (the RoPE offset of context images)."""
