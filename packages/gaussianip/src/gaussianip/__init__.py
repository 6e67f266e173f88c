"""GaussianIP: face photo + text to a 3D Gaussian human by adaptive human distillation sampling and view-consistent refinement."""

__version__ = "0.1.0"
