"""Memory and data throughput at growing dataset size: is training memory flat in the number of items, and would
the data loader keep a GPU fed at the paper's batch and item sizes?

1. Peak resident memory (MiB above the model's own) of a short RodinHD base-training run (streaming statistics
   pass + steps) and a TeRA diffusion-training run, with N = 16, 128, 1024 synthetic items that this script writes
   itself at the tiny configs' sizes. ``stream`` reads per-item records from disk (:mod:`avatar_core.data.stream`);
   ``in-memory`` stacks every item first, as both packages did before. Each measurement runs in a fresh process.
2. Data-loading throughput (items/s, MiB/s) with 0, 1 and 2 DataLoader workers against the training step time.
3. The arithmetic at paper scale: per-GPU bytes a step needs at the paper's batch and item sizes, and how many
   loader workers at the measured per-worker rate that is, for step times of 0.5 s and 1 s.

    python tools/bench_scale.py                    # all of it (about five minutes on two cores)
    python tools/bench_scale.py --sizes 16 128     # a quicker look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import PeakRSS, print_table  # noqa: E402

from avatar_core.data.stats import ChannelMoments  # noqa: E402
from avatar_core.data.stream import RecordField, RecordFolder, StreamDataset, StreamLoader  # noqa: E402

#: Item contents at the tiny configs' sizes (RodinHD: 3 x 8 x 32^2 triplane, base at 16^2, embedded-VAE features
#: of a 64^2 portrait; TeRA: 8 x 16^2 latent, 4 captions x 77 MiniLM token states of 384).
RODIN_SHAPES = {"planes": (8, 32, 96), "low": (8, 16, 48), "f0": (16, 32, 32), "f1": (32, 16, 16), "f2": (64, 8, 8)}
TERA_SHAPES = {"latents": (8, 16, 16), "states": (4, 77, 384), "mask": (4, 77)}


def _write_items(folder: RecordFolder, shapes: dict, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        if not folder.is_complete(f"{i:06d}"):
            folder.save(f"{i:06d}", {k: (torch.rand(s, generator=g) > 0.3).float() if k == "mask"
                                     else torch.randn(s, generator=g) for k, s in shapes.items()})


def _rodinhd_model():
    from rodinhd.config import load_rodinhd_config
    from rodinhd.models import build_base

    cfg = load_rodinhd_config("tiny")
    return build_base(cfg, (16, 32, 64)), cfg.base.train.batch_size


def _rodinhd_stats(model, batches) -> int:
    model.normalizer.fit(b["low"] for b in batches)  # the per-channel triplane statistics, streamed
    return 1


def _rodinhd_step(model, batch):
    return model(batch["low"], [batch["f0"], batch["f1"], batch["f2"]])["loss"]


def _tera_model():
    from tera.config import load_config
    from tera.latent_diffusion import StructuredLatentDiffusion
    from tera.stage2 import unet_config
    from tera.text import TextCondition

    cfg = load_config("tiny")
    null = TextCondition(torch.zeros(1, 77, 384), torch.ones(1, 77, dtype=torch.bool))
    return StructuredLatentDiffusion(unet_config(cfg, 8, 16, 384), null_text=null), cfg.diffusion.batch_size


def _tera_stats(model, batches) -> int:
    moments = ChannelMoments(8).update_all(b["latents"] for b in batches)
    model.latent_scale.fill_(float(1 / moments.pooled().rms()[0]))  # the latent scale, streamed
    model.latent_stats_set.fill_(True)
    return moments.count


def _tera_step(model, batch):
    from tera.text import TextCondition

    k = batch["index"] % 4  # a caption variant per item
    rows = torch.arange(len(k))
    return model(batch["latents"], TextCondition(batch["states"][rows, k], batch["mask"][rows, k].bool()))


METHODS = {"rodinhd-base": (RODIN_SHAPES, _rodinhd_model, _rodinhd_step, _rodinhd_stats, "low"),
           "tera-diffusion": (TERA_SHAPES, _tera_model, _tera_step, _tera_stats, "latents")}


def child(method: str, n: int, mode: str, workdir: Path, steps: int) -> dict:
    """One measurement in this (fresh) process: peak RSS of statistics pass + ``steps`` training steps."""
    torch.set_num_threads(1)
    shapes, build, step, fit_stats, stat_key = METHODS[method]
    folder = RecordFolder(workdir / f"{method}-{n}")
    model, batch_size = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = [f"{i:06d}" for i in range(n)]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if mode == "stream":
            loader = StreamLoader(StreamDataset(ids, [RecordField(folder)]), batch_size, seed=0)
            stats = fit_stats(model, loader(0))
            batches = loader(1)
        else:  # the old path: everything stacked in RAM, indexed per batch
            items = [folder.load(i) for i in ids]
            stacked = {k: torch.stack([it[k] for it in items]) for k in shapes}
            del items
            stats = fit_stats(model, [stacked])
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
            batches = iter([{**{k: v[perm[s:s + batch_size]] for k, v in stacked.items()},
                             "index": perm[s:s + batch_size]} for s in range(0, n - batch_size + 1, batch_size)])
        t_data = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = 0
        for batch in batches:
            loss = step(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
        t_step = (time.perf_counter() - t0) / max(done, 1)
    assert stats > 0
    return {"peak_mib": mem.mib, "step_s": t_step, "prep_s": t_data, "batch": batch_size}


def throughput(method: str, n: int, workdir: Path, workers: int) -> dict:
    """Items/s of one epoch read through the loader (batch of the tiny config), nothing else."""
    folder = RecordFolder(workdir / f"{method}-{n}")
    item_mib = folder.path("000000").stat().st_size / 2**20
    loader = StreamLoader(StreamDataset(folder.ids()[:n], [RecordField(folder)]), 8, seed=0, num_workers=workers)
    list(loader(0))  # start the workers, warm the page cache
    t0 = time.perf_counter()
    count = sum(len(b["item_id"]) for b in loader(1))
    rate = count / (time.perf_counter() - t0)
    return {"items_s": rate, "MiB_s": rate * item_mib, "item_MiB": item_mib}


#: Paper scale: (per-GPU items a step, MiB an item) from each paper's batch and the item tensors a step reads.
PAPER = {
    # RodinHD base: batch 96 on 32 V100s (Sec. 4.1) = 3 a GPU; item: the 3 x 32 x 128^2 low-res triplane (6 MiB)
    # + SDXL-VAE features of a 256^2 portrait at 128/64/32 (128 x 128^2 + 256 x 64^2 + 512 x 32^2 floats, 14 MiB).
    "rodinhd-base": (96 / 32, (3 * 32 * 128**2 + 128 * 128**2 + 256 * 64**2 + 512 * 32**2) * 4 / 2**20),
    # RodinHD upsample: batch 32 on 32 GPUs = 1 a GPU; the 3 x 32 x 512^2 triplane (96 MiB) + its 128^2 (6 MiB)
    # + the 128^2 portrait features (8 MiB); views' cameras are a few KiB.
    "rodinhd-upsample": (32 / 32, (3 * 32 * 512**2 + 3 * 32 * 128**2 + 128 * 128**2) * 4 / 2**20),
    # TeRA diffusion: batch 8 on 4 RTX 3090s = 2 a GPU; a 32 x 256^2 latent (8 MiB) + one caption's CLIP states
    # 77 x 768 (0.23 MiB; the cache holds all variants, a step reads one).
    "tera-diffusion": (8 / 4, (32 * 256**2 + 77 * 768) * 4 / 2**20),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1024])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    if args.child:
        method, n, mode = args.child
        print(json.dumps(child(method, int(n), mode, work, args.steps)))
        return

    rows = []
    for method, (shapes, *_rest) in METHODS.items():
        for n in args.sizes:
            _write_items(RecordFolder(work / f"{method}-{n}"), shapes, n)
            for mode in ("stream", "in-memory"):
                proc = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--steps", str(args.steps),
                                       "--child", method, str(n), mode], capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"method": method, "N": n, "data": mode, **r})
    print("\n1. Peak RSS above the model (MiB): statistics pass + training steps, a fresh process each")
    print_table(rows, ["method", "N", "data", "batch", "peak_mib", "prep_s", "step_s"], digits=3)
    for method in METHODS:
        s = [r["peak_mib"] for r in rows if r["method"] == method and r["data"] == "stream"]
        print(f"   {method} stream: max/min over N = {max(s) / max(min(s), 1e-9):.2f}")

    n = max(args.sizes)
    trows = []
    for method in METHODS:
        step_s = next(r["step_s"] for r in rows if r["method"] == method and r["N"] == n and r["data"] == "stream")
        for w in (0, 1, 2):
            t = throughput(method, n, work, w)
            trows.append({"method": method, "workers": w, **t, "step_s": step_s,
                          "items_per_step": next(r["batch"] for r in rows if r["method"] == method),
                          "load_s_per_step": next(r["batch"] for r in rows if r["method"] == method) / t["items_s"]})
    print(f"\n2. Data loading (one epoch of {n} items, page cache warm) against the tiny training step")
    print_table(trows, ["method", "workers", "item_MiB", "items_s", "MiB_s", "items_per_step", "load_s_per_step",
                        "step_s"], digits=4)

    per_worker = max(r["MiB_s"] for r in trows if r["workers"] == 1)
    prow = []
    for name, (per_gpu, mib) in PAPER.items():
        need = per_gpu * mib
        prow.append({"stage": name, "items_per_gpu_step": per_gpu, "item_MiB": mib, "MiB_per_gpu_step": need,
                     "MiB_s_at_1s": need, "MiB_s_at_0.5s": 2 * need,
                     "workers_at_0.5s": 2 * need / per_worker})
    print(f"\n3. Paper scale: what one GPU reads a step; workers needed at the measured {per_worker:.0f} MiB/s per worker "
          "(this machine's page cache; a shared filesystem's own bandwidth caps the sum over GPUs)")
    print_table(prow, ["stage", "items_per_gpu_step", "item_MiB", "MiB_per_gpu_step", "MiB_s_at_1s",
                       "MiB_s_at_0.5s", "workers_at_0.5s"], digits=2)


if __name__ == "__main__":
    main()
