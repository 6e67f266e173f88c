"""Storage formats for per-item training records: per-item safetensors in a folder vs tar shards (webdataset) vs
litdata chunks. Writes N synthetic float32 items, then reads one shuffled epoch through a DataLoader with 0 and 2
workers; prints write time, read throughput and the bytes on disk.

    python tools/bench_formats.py [--num 512] [--shape 3 8 64 64] [--workdir /tmp/bench_formats]

webdataset and litdata are optional (the formats that are not installed are left out of the table); the kernel's
streaming layer (:mod:`avatar_core.data.stream`) uses the per-item folder, see its module docstring for why.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import print_table  # noqa: E402

from avatar_core.io import load_tensors, save_tensors  # noqa: E402


class FolderItems(Dataset):
    def __init__(self, root: Path, n: int):
        self.root, self.n = root, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return load_tensors(self.root / f"{i:06d}.safetensors")[0]["x"]


def _shuffled(n: int, seed: int = 0) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def bench_folder(root: Path, items: list[np.ndarray], workers: int) -> dict:
    t0 = time.perf_counter()
    if not root.exists():
        for i, x in enumerate(items):
            save_tensors(root / f"{i:06d}.safetensors", {"x": torch.from_numpy(x)})
    t_write = time.perf_counter() - t0
    ds = FolderItems(root, len(items))
    loader = DataLoader(ds, batch_size=8, sampler=_shuffled(len(items)), num_workers=workers)
    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in loader)
    return {"write_s": t_write, "read_items_s": n / (time.perf_counter() - t0), "random_access": "yes"}


def bench_webdataset(root: Path, items: list[np.ndarray], workers: int) -> dict:
    import webdataset as wds

    t0 = time.perf_counter()
    if not root.exists():
        root.mkdir(parents=True)
        with wds.ShardWriter(str(root / "shard-%05d.tar"), maxcount=64) as sink:
            for i, x in enumerate(items):
                buf = io.BytesIO()
                np.save(buf, x)
                sink.write({"__key__": f"{i:06d}", "x.npy": buf.getvalue()})
    t_write = time.perf_counter() - t0
    shards = sorted(str(p) for p in root.glob("*.tar"))
    ds = (wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False).shuffle(64)
          .decode().to_tuple("x.npy").map(lambda s: torch.from_numpy(s[0])).batched(8, collation_fn=torch.stack))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in loader)
    return {"write_s": t_write, "read_items_s": n / (time.perf_counter() - t0),
            "random_access": "no (shard order + 64-item buffer)"}


def _litdata_item(i: int, items=None):
    return {"index": i, "x": items[i]}


def bench_litdata(root: Path, items: list[np.ndarray], workers: int) -> dict:
    import functools

    from litdata import StreamingDataLoader, StreamingDataset, optimize

    t0 = time.perf_counter()
    if not root.exists():
        optimize(fn=functools.partial(_litdata_item, items=items), inputs=list(range(len(items))),
                 output_dir=str(root), chunk_bytes="64MB", num_workers=1, mode="overwrite")
    t_write = time.perf_counter() - t0
    ds = StreamingDataset(str(root), shuffle=True, seed=0)
    loader = StreamingDataLoader(ds, batch_size=8, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(b["x"].shape[0] for b in loader)
    return {"write_s": t_write, "read_items_s": n / (time.perf_counter() - t0), "random_access": "yes (chunk index)"}


def _du(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--shape", type=int, nargs="+", default=[3, 8, 64, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--workdir", default="/tmp/bench_formats")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(0)
    items = [rng.standard_normal(args.shape, dtype=np.float32) for _ in range(args.num)]
    mb = items[0].nbytes / 2**20
    formats = {"safetensors folder": bench_folder}
    if importlib.util.find_spec("webdataset"):
        formats["webdataset tar"] = bench_webdataset
    if importlib.util.find_spec("litdata"):
        formats["litdata chunks"] = bench_litdata
    rows = []
    for name, fn in formats.items():
        root = work / name.split()[0]
        for w in args.workers:
            r = fn(root, items, w)
            rows.append({"format": name, "workers": w, "item_MiB": mb, "write_s": r["write_s"] if w == args.workers[0]
                         else None, "read_items_s": r["read_items_s"], "MiB_s": r["read_items_s"] * mb,
                         "disk_MiB": _du(root), "exact_order_resume": r["random_access"]})
    print(f"{args.num} items of {tuple(args.shape)} float32 ({mb:.2f} MiB each), one shuffled epoch, batch 8")
    print_table(rows, ["format", "workers", "item_MiB", "write_s", "read_items_s", "MiB_s", "disk_MiB",
                       "exact_order_resume"], digits=2)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
