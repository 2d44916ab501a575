"""What computes: configs, flat block layouts, the decoder, tensor-parallel pieces, weight sources."""
