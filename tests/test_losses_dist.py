"""Two real gloo ranks (CPU processes): `FeatureQueue.enqueue` all-gathers before writing, in rank order, and
`all_gather_with_grad` gives DDP-correct ITC gradients.

Each rank enqueues its own features and ids; afterwards both ranks' queues must hold rank 0's batch followed by
rank 1's, the same pointer, and a global batch that does not divide the queue size must fail on both ranks.
"""
import os, sys, socket, traceback
from pathlib import Path
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, B, D, Q = 2, 3, 4, 12
ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _feats(rank, step):
    "Distinct, recognisable features per (rank, step)."
    base = 100 * step + 10 * rank
    return (torch.arange(B * D, dtype=torch.float32).view(B, D) + base, -(torch.arange(B * D, dtype=torch.float32).view(B, D) + base),
            torch.arange(B) + base)


def _check_itc_grad(rank):
    """In-batch ITC over the gathered global batch (X-VLM style): each rank's gradient on its own rows, summed over
    ranks by the gather's backward, must be world_size x the one-process gradient of the global-batch loss (DDP then
    averages the parameter gradients back to the one-process value)."""
    from vlnb.losses import ITCLoss, all_gather_with_grad, concat_all_gather
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(3)
    v_all = F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1)
    t_all = F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1)
    ids_all = torch.tensor([0, 1, 1, 2, 3, 0])
    sl = slice(rank * B, (rank + 1) * B)
    v, t = v_all[sl].clone().requires_grad_(), t_all[sl].clone().requires_grad_()
    temp = torch.tensor(0.1)
    out = ITCLoss()(all_gather_with_grad(v), all_gather_with_grad(t), temp, idx=concat_all_gather(ids_all[sl]))
    out.loss.backward()
    v1, t1 = v_all.clone().requires_grad_(), t_all.clone().requires_grad_()
    ref = ITCLoss()(v1, t1, temp, idx=ids_all)
    ref.loss.backward()
    assert torch.allclose(out.loss, ref.loss, atol=1e-6), (out.loss, ref.loss)
    assert torch.allclose(v.grad, WORLD * v1.grad[sl], atol=1e-6), (v.grad, v1.grad[sl])
    assert torch.allclose(t.grad, WORLD * t1.grad[sl], atol=1e-6), (t.grad, t1.grad[sl])


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))   # works without an (editable) install too
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    try:
        from vlnb.losses import FeatureQueue, concat_all_gather
        torch.manual_seed(0)                      # same random initial queue on both ranks
        q = FeatureQueue(dim=D, size=Q)
        init = q.image_queue.clone()
        x = torch.full((2,), float(rank), requires_grad=True)
        g = concat_all_gather(x)
        assert g.tolist() == [0., 0., 1., 1.] and not g.requires_grad, g
        for step in range(3):                     # 3 steps x global batch 6 = 18 > Q=12: wraps around once
            q.enqueue(*_feats(rank, step))
        # expected: rows 0..5 = step 2 (rank 0 then rank 1), rows 6..11 = step 1
        exp_i = torch.cat([_feats(0, 2)[0], _feats(1, 2)[0], _feats(0, 1)[0], _feats(1, 1)[0]])
        exp_t = torch.cat([_feats(0, 2)[1], _feats(1, 2)[1], _feats(0, 1)[1], _feats(1, 1)[1]])
        exp_id = torch.cat([_feats(0, 2)[2], _feats(1, 2)[2], _feats(0, 1)[2], _feats(1, 1)[2]])
        assert torch.equal(q.image_queue, exp_i), (rank, q.image_queue)
        assert torch.equal(q.text_queue, exp_t), (rank, q.text_queue)
        assert torch.equal(q.idx_queue, exp_id), (rank, q.idx_queue)
        assert q.queue_ptr.item() == 6, q.queue_ptr
        assert not torch.equal(init, q.image_queue)
        q2 = FeatureQueue(dim=D, size=8)          # global batch 6 does not divide 8
        try:
            q2.enqueue(*_feats(rank, 0))
            raise RuntimeError('expected an AssertionError for queue size 8 and global batch 6')
        except AssertionError as e:
            assert 'global batch size 6' in str(e), e
        _check_itc_grad(rank)
        open(os.path.join(out_dir, f'ok{rank}'), 'w').write('ok')
    except Exception:
        open(os.path.join(out_dir, f'err{rank}'), 'w').write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed not available')
def test_queue_gather_two_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    errs = [p.read_text() for p in tmp_path.glob('err*')]
    assert not errs, '\n'.join(errs)
    assert sorted(p.name for p in tmp_path.glob('ok*')) == ['ok0', 'ok1']
