"""Run by test_stream.py under ``torchrun --nproc_per_node 2``: each process writes the item ids it is served."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from avatar_core.data.cache import FeatureCache
from avatar_core.data.stream import RecordField, RecordFolder, StreamDataset, StreamLoader


def folder_load(folder: Path, item_id: str) -> torch.Tensor:
    return RecordFolder(folder).load(item_id)["planes"]


if __name__ == "__main__":
    folder, out, batch_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)  # initialises the gloo process group from torchrun's environment
    ids = sorted(p.stem for p in folder.glob("*.safetensors"))
    loader = StreamLoader(StreamDataset(ids, [RecordField(folder)]), batch_size, seed=3, num_workers=1)
    seen = {e: [i for b in loader(e) for i in b["item_id"]] for e in (0, 1)}
    sizes = [len(b["item_id"]) for b in loader(0)]
    # A feature cache built by both processes together: each computes its share, then every item is readable.
    cache = FeatureCache(out / "cache", "double", {"what": "x2"})
    built = cache.build(ids, lambda chunk: [None if i == ids[3] else {"x": 2 * folder_load(folder, i)} for i in chunk])
    readable = sorted(i for i in ids if cache.valid(i))
    (out / f"rank_{acc.process_index}.json").write_text(json.dumps({"seen": seen, "sizes": sizes,
                                                                   "world": acc.num_processes, "built": built,
                                                                   "readable": readable}))
    acc.wait_for_everyone()
