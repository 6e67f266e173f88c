"""`make demo`: run the toolkit on the embedded defaults and leave viewable results.

The convention every part follows (the kernel here, then each method package):

- A method package NAME has a module ``NAME.demo`` with ``run(out: pathlib.Path, *, smallest: bool = False) -> dict``.
  It trains or builds what it shows inside ``out`` (= ``--out/NAME``), writes viewable files there (turntables,
  PLY files, images), and returns a JSON-able dict (paths, timings, notes) that goes into ``summary.json`` under
  ``NAME``. ``smallest=True`` runs every step at the smallest size that still exercises it (a smoke test for
  ``tests/test_demo.py``, seconds per part); the default is the demo scale (a minute or two per part on a CPU).
- This script runs the kernel part, then ``NAME.demo.run`` of every package in :data:`PACKAGES` that is installed,
  in that order; ``--parts`` picks a subset. A package that is not installed, or has no ``demo`` module yet, is
  skipped with a line saying so.

Kernel part: the Anny body as a UV-structured 3D Gaussian avatar (one Gaussian per texel of its UV map, coloured by
body part), rendered by the kernel's rasterizer as a turntable video, exported as a 3DGS PLY that splat viewers
open, and animated by skinning: ``environment.txt``, ``body_turntable.mp4``, ``body_views.png``,
``body_avatar.ply``, ``body_animation.mp4``, and ``summary.json`` for all parts.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from pathlib import Path
from types import ModuleType

import torch

from avatar_core.body import UVMapper, load_body_model
from avatar_core.body.model import PART_NAMES
from avatar_core.cameras import orbit_cameras
from avatar_core.env import environment_report, format_report
from avatar_core.io import image_grid, save_image, save_json, save_ply, write_video
from avatar_core.render.turntable import gaussian_render_fn, turntable

# One colour per body part, so the turntable shows the part segmentation the methods paint on.
PART_COLOURS = {
    "head": (0.93, 0.76, 0.65), "hair": (0.35, 0.22, 0.12), "upper_body": (0.20, 0.45, 0.80),
    "lower_body": (0.15, 0.15, 0.25), "arms": (0.90, 0.70, 0.58), "hands": (0.95, 0.75, 0.62),
    "legs": (0.22, 0.25, 0.45), "feet": (0.10, 0.10, 0.10),
}


def body_avatar(resolution: int) -> dict[str, torch.Tensor | object]:
    """Gaussians on the body's UV texels: positions follow the surface, colours follow the part masks."""
    body = load_body_model("anny")
    mapper = UVMapper(body, resolution)
    face_idx, bary, _uv = mapper.sample_points("texels")
    labels = mapper.part_label_map()[mapper.mask]  # [N], texel order matches sample_points("texels")
    palette = torch.tensor([PART_COLOURS[name] for name in PART_NAMES])
    rest = body().vertices  # [1, V, 3]
    means = mapper.points_on_surface(rest, face_idx, bary)[0]
    # Bake soft key lighting into the colours so the shape reads in a still image.
    normals = torch.nn.functional.normalize(mapper.points_on_surface(body.vertex_normals(rest), face_idx, bary)[0], dim=-1)
    light = torch.nn.functional.normalize(torch.tensor([0.4, 0.6, 0.7]), dim=0)
    shade = 0.6 + 0.4 * (normals @ light).clamp_min(0)
    # Flat splats, each covering its own texel's footprint on the surface (the UV map samples the head about three
    # times as densely as the shins: one size for all leaves the sparse parts see-through in splat viewers).
    quats, scales = texel_footprints(body, rest[0], face_idx, resolution)
    n = len(means)
    return {
        "body": body, "mapper": mapper, "face_idx": face_idx, "bary": bary, "resolution": resolution,
        "means": means, "quats": quats, "scales": scales, "opacities": torch.full((n,), 0.95),
        "colors": palette[labels] * shade[:, None],
    }


def texel_footprints(body, vertices: torch.Tensor, face_idx: torch.Tensor, resolution: int,
                     coverage: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations (wxyz) [N, 3] and scales [N, 3] of flat Gaussians that cover their texel on the surface.

    The UV-to-surface map of the texel's triangle (3x2 Jacobian) stretches a texel's square into a parallelogram;
    its singular vectors and values give the Gaussian's two in-surface axes and extents (``coverage`` times the
    texel's side along each), the normal gets a tenth of the smaller one. ``vertices`` [V, 3] may be posed: the
    frames then follow the posed triangles."""
    from scipy.spatial.transform import Rotation

    tri, uvt = vertices[body.faces], body.uv_coords[body.uv_faces]
    e3d = torch.stack([tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]], -1).double()  # [F, 3, 2]
    euv = torch.stack([uvt[:, 1] - uvt[:, 0], uvt[:, 2] - uvt[:, 0]], -1).double()  # [F, 2, 2]
    u, sv, _ = torch.linalg.svd((e3d @ torch.linalg.pinv(euv))[face_idx], full_matrices=False)  # [N,3,2], [N,2]
    side = sv / resolution  # the texel's side along each principal direction, metres
    side = side.clamp(0.25 * side.median(), 4 * side.median())  # UV triangles of (almost) no area
    frame = torch.stack([u[..., 0], u[..., 1], torch.linalg.cross(u[..., 0], u[..., 1])], -1)  # det +1
    quats = torch.from_numpy(Rotation.from_matrix(frame.numpy()).as_quat()[:, [3, 0, 1, 2]]).float()
    scales = coverage * torch.cat([side, 0.1 * side.min(-1, keepdim=True).values], -1)
    return quats, scales.float()


def wave_motion(body, frames: int) -> torch.Tensor:
    """A short built-in motion: both arms wave, the knees bend a little. Axis-angle pose [T, J-1, 3]."""
    pose = torch.zeros(frames, len(body.joint_names) - 1, 3)
    phase = torch.linspace(0, 2 * math.pi, frames)
    for side, sign in (("L", 1.0), ("R", -1.0)):
        pose[:, body.joint_index(f"upperarm01.{side}") - 1, 2] = sign * (0.6 + 0.5 * torch.sin(phase))
        pose[:, body.joint_index(f"lowerleg01.{side}") - 1, 0] = 0.25 * (1 - torch.cos(phase)) / 2
    return pose


def kernel_demo(out: Path, resolution: int, size: int, frames: int, convention: str = "opengl") -> dict[str, str]:
    av = body_avatar(resolution)
    body = av["body"]
    target = (0.0, 0.0, 0.0)
    render = gaussian_render_fn(av["means"], av["quats"], av["scales"], av["opacities"], av["colors"])
    video = turntable(render, num_frames=frames, radius=3.2, elevation=5.0, fov_deg=35, width=size, height=size,
                      target=target, path=out / "body_turntable.mp4", fps=12)
    views = render(orbit_cameras(4, 3.2, 5.0, 35, size, size, target))
    save_image(out / "body_views.png", image_grid(list(views), nrow=4))
    ply = save_ply(out / "body_avatar.ply", av["means"], av["quats"], av["scales"], av["opacities"], colors=av["colors"],
                   convention=convention)

    motion = wave_motion(body, frames)
    posed = body(pose=motion).vertices  # [T, V, 3]
    means_t = av["mapper"].points_on_surface(posed, av["face_idx"], av["bary"])  # [T, N, 3]
    front = orbit_cameras(1, 3.2, 5.0, 35, size, size, target)
    clip = []
    for t in range(frames):
        quats_t, scales_t = texel_footprints(body, posed[t], av["face_idx"], av["resolution"])  # splats turn with the surface
        fn = gaussian_render_fn(means_t[t], quats_t, scales_t, av["opacities"], av["colors"])
        clip.append(fn(front)[0])
    anim = write_video(out / "body_animation.mp4", torch.stack(clip), fps=12)
    return {"gaussians": str(len(av["means"])), "turntable": str(video.shape[0]) + " frames",
            "turntable_video": str(out / "body_turntable.mp4"), "views": str(out / "body_views.png"),
            "ply": str(ply), "animation": str(anim)}


#: Method packages whose ``demo`` module runs after the kernel part, in this order.
PACKAGES = ("tera", "rodinhd", "gaussianip", "gas")
#: The kernel part's sizes at ``--smallest``.
SMALLEST_KERNEL = {"uv_res": 64, "size": 64, "frames": 4}


def package_demo(name: str) -> ModuleType | None:
    """``NAME.demo`` when the package is installed and has one; None otherwise (a broken import still raises)."""
    try:
        return importlib.import_module(f"{name}.demo")
    except ModuleNotFoundError as err:
        if err.name in (name, f"{name}.demo"):
            return None
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--uv-res", type=int, default=256, help="kernel part: one Gaussian per valid UV texel")
    parser.add_argument("--size", type=int, default=256, help="kernel part: rendered image size in pixels")
    parser.add_argument("--frames", type=int, default=24, help="kernel part: turntable and animation frames")
    parser.add_argument("--convention", choices=("opengl", "opencv"), default="opengl",
                        help="kernel part: the PLY's world (opengl: +y up, facing +z; opencv: -y up, facing -z)")
    parser.add_argument("--parts", default=",".join(("kernel",) + PACKAGES),
                        help="comma-separated parts to run (kernel and package names; default: all)")
    parser.add_argument("--smallest", action="store_true",
                        help="every part at its smallest size (a smoke test; overrides --uv-res/--size/--frames)")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"kernel", *PACKAGES})
    if unknown:
        parser.error(f"unknown demo parts {unknown}; choose from kernel, {', '.join(PACKAGES)}")
    if args.smallest:
        args.uv_res, args.size, args.frames = (SMALLEST_KERNEL[k] for k in ("uv_res", "size", "frames"))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict[str, object] = {}

    report = format_report(environment_report())
    (args.out / "environment.txt").write_text(report + "\n")
    print(report)
    summary["environment"] = str(args.out / "environment.txt")

    if "kernel" in parts:
        t = time.time()
        summary["kernel"] = kernel_demo(args.out, args.uv_res, args.size, args.frames, args.convention)
        summary["kernel"]["seconds"] = f"{time.time() - t:.1f}"
        print(f"\nkernel: UV Gaussian avatar, turntable, PLY and animation in {time.time() - t:.1f} s")
    for name in PACKAGES:
        if name not in parts:
            continue
        module = package_demo(name)
        if module is None:
            print(f"{name}: skipped (not installed, or no {name}.demo module)")
            summary[name] = "skipped: not installed or no demo module"
            continue
        t = time.time()
        summary[name] = module.run(args.out / name, smallest=args.smallest)
        print(f"{name}: demo part done in {time.time() - t:.1f} s ({args.out / name})")

    summary["seconds"] = round(time.time() - t0, 2)
    save_json(args.out / "summary.json", summary)
    print(f"\ndemo outputs in {args.out}/:")
    for p in sorted(args.out.iterdir()):
        print(f"  {p.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
