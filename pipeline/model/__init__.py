"""Model: the pix2pixHD-style generator and multi-scale discriminator, their losses, and the portable
generator file (weights + spec)."""
