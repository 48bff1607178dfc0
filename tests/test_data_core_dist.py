"""Two real gloo ranks (CPU processes): `make_loader` reads rank and world size from torch.distributed when they are
not given, the two ranks' batches are disjoint halves of one epoch order, and a resumed loader (start_step) on each
rank yields exactly the tail of that rank's batches, items (images and picked captions) included.
"""
import json, os, socket, sys, traceback
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dataset(root):
    from vlnb.data.core import PretrainDataset, build_transform
    recs = [dict(image=f'{i}.png', caption=[f'caption {i} a', f'caption {i} b'], image_id=i) for i in range(9)]
    return PretrainDataset(recs, root, build_transform('train', 16, 'pretrain'))     # no seed: the loader's is used


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    try:
        from vlnb.data.core import make_loader
        ds = _dataset(root)
        collate = lambda items: dict(idx=[it['idx'] for it in items], text=[it['text'] for it in items],
                                     image=torch.stack([it['image'] for it in items]))
        full = list(make_loader(ds, 2, seed=11, epoch=3, collate_fn=collate))
        tail = list(make_loader(ds, 2, seed=11, epoch=3, collate_fn=collate, start_step=1))
        assert len(full) == 3 and len(tail) == 2, (len(full), len(tail))   # ceil(9 / 2) = 5 items per rank -> 3 batches
        for a, b in zip(full[1:], tail):
            assert a['text'] == b['text'] and torch.equal(a['image'], b['image'])
        out = dict(idx=[i for b in full for i in b['idx']], text=[t for b in full for t in b['text']])
        Path(root, f'rank{rank}.json').write_text(json.dumps(out))
    except Exception:
        Path(root, f'rank{rank}.err').write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def test_two_ranks_shard_and_resume(tmp_path):
    from PIL import Image
    from vlnb.data.core import ShardedSampler
    for i in range(9): Image.fromarray(np.full((20, 24, 3), 20 * i, np.uint8)).save(tmp_path / f'{i}.png')
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method='fork', join=True)
    errs = [p.read_text() for p in tmp_path.glob('rank*.err')]
    assert not errs, '\n'.join(errs)
    r = [json.loads((tmp_path / f'rank{k}.json').read_text()) for k in range(WORLD)]
    # the epoch order, padded to 10 by repeating its first index, split by stride 2
    order = ShardedSampler(9, seed=11, epoch=3, rank=0, world_size=1).indices()
    padded = order + order[:1]
    for k in range(WORLD): assert r[k]['idx'] == padded[k::WORLD], (k, r[k]['idx'], padded)
    assert sorted(r[0]['idx'] + r[1]['idx']) == sorted(padded)
    # one process with explicit rank/world_size reproduces what each distributed rank saw
    from vlnb.data.core import make_loader
    ds = _dataset(tmp_path)
    for k in range(WORLD):
        texts = [it['text'] for b in make_loader(ds, 2, seed=11, epoch=3, rank=k, world_size=WORLD, collate_fn=lambda x: x) for it in b]
        assert texts == r[k]['text'], (k, texts, r[k]['text'])
