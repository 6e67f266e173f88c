"""GAS: single image to novel views and poses by a generalizable human NeRF conditioning a video diffusion model."""

__version__ = "0.1.0"
