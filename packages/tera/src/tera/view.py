"""``tera view``'s animator: generated avatars posed by a built-in motion on demand in the viewer
(:mod:`avatar_core.view`), with the run's models (Sec. 3.1) loaded once, on the first request."""

from __future__ import annotations

from collections.abc import Callable

from tera.config import TeraConfig

__all__ = ["AvatarAnimator"]


class AvatarAnimator:
    """Poses a generated avatar (a result folder holding ``avatar.safetensors``) by a built-in motion.

    Args:
        config: returns the run's config when the first avatar is posed (the viewer starts without loading models).
    """

    def __init__(self, config: Callable[[], TeraConfig]):
        from tera.animate import MOTIONS

        self._config, self.motions, self._models = config, tuple(MOTIONS), None

    def can_animate(self, result) -> bool:
        return (result.path / "avatar.safetensors").is_file()

    def __call__(self, result, motion: str):
        from avatar_core.view import splats_from_tensors
        from tera import animate as anim
        from tera.avatars import decode, load_avatar, load_models, stored_shape

        cfg = self._config()
        self._models = self._models or load_models(cfg, with_diffusion=False)
        m = self._models
        latent, meta = load_avatar(result.path, m)
        shape = stored_shape(meta)
        _, g = decode(m, latent, shape)
        f = anim.animate(m.avatar, g, anim.builtin_motion(m.avatar.body, motion, cfg.animate.frames).to(m.device),
                         shape=None if shape is None else shape.to(m.device))
        return [splats_from_tensors(f.means[t], f.quats[t], f.scales[t], f.opacities[t], f.colors[t])
                for t in range(len(f))]
