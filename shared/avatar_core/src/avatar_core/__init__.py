"""avatar_core: the kernel shared by the TeRA, GaussianIP, RodinHD and GAS packages."""

__version__ = "0.1.0"
