"""degsr: degradation-guided one-step image super-resolution with a diffusion prior (S3Diff)."""

__version__ = "0.1.0"
