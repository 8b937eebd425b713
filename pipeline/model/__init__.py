"""Model: what the networks see (inputs), the pix2pixHD-style generator and multi-scale discriminator
(networks), their losses, the generator spec (spec), the portable generator file (export) and the one way
to run an exported generator (inference)."""
