"""The synthetic avatar dataset: the embedded default training data of every method.

Anny bodies in an A-pose or sampled natural poses, appearance painted in UV space (skin, hair, face,
garments with patterns, shoes), calibrated multi-view RGBA renders, a front portrait, body parameters, the
UV texture and a caption with phrase variants per avatar (:mod:`.generate` documents the folder layout),
and torch ``Dataset`` views of it per use (:mod:`.datasets`).
"""

from avatar_core.data.appearance import (
    GARMENT_COLOURS,
    GARMENT_TYPES,
    HAIR_COLOURS,
    HAIR_STYLES,
    PATTERNS,
    SEGMENT_NAMES,
    SKIN_TONES,
    TexturePainter,
    sample_attributes,
)
from avatar_core.data.captions import garment_phrase, make_captions
from avatar_core.data.datasets import AvatarDataset, CaptionDataset, MultiViewDataset, PortraitDataset
from avatar_core.data.generate import AvatarGenerator, generate_dataset, render_textured, write_contact_sheet
from avatar_core.data.poses import build_pose, sample_pose_params

__all__ = [
    "GARMENT_COLOURS",
    "GARMENT_TYPES",
    "HAIR_COLOURS",
    "HAIR_STYLES",
    "PATTERNS",
    "SEGMENT_NAMES",
    "SKIN_TONES",
    "AvatarDataset",
    "AvatarGenerator",
    "CaptionDataset",
    "MultiViewDataset",
    "PortraitDataset",
    "TexturePainter",
    "build_pose",
    "garment_phrase",
    "generate_dataset",
    "make_captions",
    "render_textured",
    "sample_attributes",
    "sample_pose_params",
    "write_contact_sheet",
]
