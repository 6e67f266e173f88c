"""The shipped configs: paper.yaml carries the paper's numbers, authors_code.yaml the authors' code's.

The expected numbers are typed here from the paper (Table 5, App. A, Eq. 6) and from the authors' training flags
(github.com/RodinHD/RodinHD @ 690d34d), not read from the configs.
"""

from __future__ import annotations

import math
from pathlib import Path

from rodinhd.config import CONFIG_DIR, load_rodinhd_config
from rodinhd.replay import decoder_lr_at, triplane_lr_at

# Table 5, "Ours" column, and App. A.
PAPER = {
    "stage1.inner_iterations": 5000, "stage1.outer_loops": 30, "stage1.tv_weight": 1e-2, "stage1.l2_weight": 1e-4,
    "stage1.iwc_weight": 0.1, "stage1.weight_decay": 0.0, "stage1.rays_per_step": 8192, "stage1.num_samples": 1024,
    "stage1.num_avatars": 64, "stage2.iterations": 25000, "upsample.perceptual_weight": 1.0,
    "upsample.image_loss_weight": 1.0, "triplane.channels": 32, "triplane.resolution": 512,
}
# The authors' code.
CODE = {
    "stage1.inner_iterations": 6000, "stage1.num_avatars": 256, "stage1.tv_weight": 2e-4, "stage1.l1_weight": 1e-6,
    "stage1.l2_weight": 0.0, "stage2.iterations": 30000, "upsample.perceptual_weight": 0.5,
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_paper_and_authors_code_configs_hold_their_sources_numbers():
    paper, code = load_rodinhd_config("paper"), load_rodinhd_config("authors_code")
    for key, value in PAPER.items():
        assert math.isclose(_get(paper, key), value), key
    for key, value in CODE.items():
        assert math.isclose(_get(code, key), value), key
    # Table 5: triplane 2e-3 and decoder 2e-4, both constant over all 30 loops.
    s = paper.stage1
    for loop, step in [(0, 0), (29, 30 * 5000 * 64)]:
        assert math.isclose(triplane_lr_at(loop, s.triplane_lr, s.triplane_lr_loop_decay), 2e-3)
        assert math.isclose(decoder_lr_at(step, s.inner_iterations, s.decoder_lr, s.decoder_lr_decay_visits), 2e-4)
    # The code: 2e-2 / (10 loop + 1) and 2e-3 * 0.1^(iter / (50 inner)).
    c = code.stage1
    assert math.isclose(triplane_lr_at(3, c.triplane_lr, c.triplane_lr_loop_decay), 2e-2 / 31)
    assert math.isclose(decoder_lr_at(50 * 6000, c.inner_iterations, c.decoder_lr, c.decoder_lr_decay_visits), 2e-4)


def test_every_line_of_the_paper_configs_cites_its_source():
    for name in ("paper.yaml", "authors_code.yaml"):
        text = (Path(CONFIG_DIR) / name).read_text()
        for block in ("stage1:", "stage2:"):
            body = text.split(block, 1)[1].split("\n\n", 1)[0]
            lines = [ln for ln in body.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
            uncited = [ln for ln in lines if "#" not in ln]
            assert lines and not uncited, (name, block, uncited)
    assert "code @ 690d34d" in (Path(CONFIG_DIR) / "authors_code.yaml").read_text()
