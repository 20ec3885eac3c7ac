"""dictbench: train sparse autoencoders under one budget and score them with task modules."""

__version__ = "0.1.0"
