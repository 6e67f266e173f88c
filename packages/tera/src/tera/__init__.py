"""TeRA: text to a UV-structured 3D Gaussian avatar by latent diffusion; try-on editing; animation by skinning."""

__version__ = "0.1.0"
