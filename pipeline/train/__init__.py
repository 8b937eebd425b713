"""Training: DeepSpeed engines, the three JPD-SE phases with checkpoints and resume, validation on
held-out frames, and the Ray Tune search of the perception-distortion weights."""
