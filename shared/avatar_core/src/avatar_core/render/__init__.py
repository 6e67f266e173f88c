"""Differentiable rendering: 3D Gaussians, radiance fields, conditioning images."""
