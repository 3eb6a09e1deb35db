"""Quantize stage: weight schemes (int8, 8da4w, 4w), SmoothQuant, and their stored format."""
