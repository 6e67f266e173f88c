"""Units and conventions, written down once for the whole kernel.

World space
    Right-handed, metres, **+Y up**, the body stands on the XZ plane's origin region and
    faces **+Z** (so a camera in front of the body sits at positive z and looks towards -z).

Cameras
    ``viewmats`` are **world-to-camera** 4x4 matrices in the **OpenCV** convention: camera +X right,
    +Y down, +Z forward (into the scene). Intrinsics ``K`` are pixel-space 3x3 matrices; pixel
    centres are at ``(j + 0.5, i + 0.5)`` for column ``j``, row ``i``. OpenGL/Blender cameras
    (+Y up, looking down -Z) convert with :data:`OPENGL_TO_OPENCV`.

Rotations
    Quaternions are **(w, x, y, z)**, not necessarily normalised where they are inputs to
    rendering. Axis-angle vectors have the rotation angle (radians) as their norm.

Images
    Float tensors in ``[0, 1]``, channels last ``[..., H, W, C]`` inside the kernel; file I/O
    uses 8-bit PNG (RGBA where there is alpha).

UV space
    ``(u, v)`` in ``[0, 1]^2`` with **v = 0 at the bottom** (OpenGL texture convention). A UV map
    of resolution ``R`` stores texel ``(row i, column j)`` at ``u = (j + 0.5) / R`` and
    ``v = 1 - (i + 0.5) / R``, i.e. row 0 is the top of the texture image.

Triplanes
    Three planes ``xy``, ``xz``, ``yz`` in that order, each ``[C, H, W]``; rolled out side by side
    to ``[C, H, 3W]``.
"""

from __future__ import annotations

import torch

#: Flips camera Y and Z: multiplies an OpenGL camera-to-world on the right to get OpenCV's.
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))

WORLD_UP = (0.0, 1.0, 0.0)
BODY_FORWARD = (0.0, 0.0, 1.0)
