"""RodinHD: portrait to a high-fidelity triplane avatar by cascaded triplane diffusion."""

__version__ = "0.1.0"
