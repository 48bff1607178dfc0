"""ALBEF pre-training on two CPU ranks: a real `accelerate launch --multi_gpu --num_processes 2` of
tests/pretrain_dist_worker.py (`vlnb.core.get_accelerator`'s CPU detection, the pre-training recipe's data, model and
`vlnb.train.Trainer`, momentum distillation and the feature queue active from step 1), checked against one process.

What the code claims, and so what is checked:
- In-batch ITC negatives, ITM hard negatives and MLM are per rank (ALBEF: nothing but the queue is gathered), and the
  initial queue is the same on both ranks (same seed), so rank k's step-1 loss is one process's loss on rank k's shard
  with the same initial weights, given the same random draws. Dropout, ITM hard-negative sampling and MLM masking all
  draw from the global torch RNG (the trainer passes no `generator`), which the trainer seeds with `seed + rank`: the
  single process seeds itself the same way (and the test checks that this is the state rank k's forward started from).
- `FeatureQueue.enqueue` gathers the momentum features of all ranks in rank order: after step 1 both queues hold rank 0's
  momentum features then rank 1's (each equal to the single process's on that shard), the rest untouched, pointer 2B.
- DDP averages the gradients and the EMA / queue updates are identical: every entry of the state dict (parameters,
  momentum copies, queues, step) is bit-identical across ranks after each of the steps, and training moved it.
"""
import copy, os, signal, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import pretrain_dist_worker as W                            # noqa: E402

LOSSES = ('loss', 'loss_itc', 'loss_itm', 'loss_mlm')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch_cmd(out_dir):
    "The `accelerate launch` command line of the worker (the console script beside this python, else the module)."
    exe = Path(sys.executable).parent / 'accelerate'
    launcher = [str(exe), 'launch'] if exe.exists() else [sys.executable, '-m', 'accelerate.commands.launch']
    return launcher + ['--multi_gpu', '--num_processes', str(W.WORLD), '--num_machines', '1', '--mixed_precision', 'no',
                       '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
                       str(HERE / 'pretrain_dist_worker.py'), str(out_dir)]


def _single_process(tok, train, collate):
    "One process: the same initial model, and per rank k its shard's first batch and step-1 forward seeded like rank k."
    from vlnb.core import seed_everything
    from vlnb.data.core import make_loader
    model0 = W.make_model(tok)
    init = {k: v.clone() for k, v in model0.state_dict().items()}
    refs = []
    for k in range(W.WORLD):
        batch = next(iter(make_loader(train, W.B, shuffle=True, seed=W.SEED, epoch=0, rank=k, world_size=W.WORLD,
                                      collate_fn=collate, drop_last=True)))
        m = copy.deepcopy(model0).train()
        seed_everything(W.SEED, rank=k)                     # what Trainer(seed=SEED) does on rank k
        rng = torch.get_rng_state()
        out = m(batch)
        refs.append(dict(batch=batch, rng=rng, out={n: getattr(out, n).detach() for n in LOSSES}, alpha=out.alpha,
                         queue={n: b.clone() for n, b in m.queue.named_buffers()}))
    return init, refs


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Launch the two ranks once and, while they run, compute the single-process reference:
    `(ranks, init, refs)` with `ranks` the two workers' records, `init` the initial state dict, `refs` per rank."""
    tmp = tmp_path_factory.mktemp('pretrain_dist')
    cache, out = tmp / 'cache', tmp / 'out'
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('VLNB_CACHE', str(cache))
        tok, train, collate = W.make_parts()               # data + tokenizer built once here: the ranks only read them
    env = dict(os.environ, HF_HUB_OFFLINE='1', VLNB_CACHE=str(cache), OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false',
               CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    log = tmp / 'launch.log'                                # a file, not a pipe: the child never blocks on a full pipe
    with open(log, 'w') as f:
        p = subprocess.Popen(_launch_cmd(out), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try: init, refs = _single_process(tok, train, collate)
            finally: torch.set_num_threads(threads)
            p.wait(timeout=300)
        finally:
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()   # the launcher and its two ranks
    assert p.returncode == 0, f'accelerate launch failed ({p.returncode}):\n{log.read_text()[-8000:]}'
    ranks = [torch.load(out / f'rank{k}.pt', weights_only=False) for k in range(W.WORLD)]
    return ranks, init, refs


def test_two_ranks_form_one_gloo_group(run):
    ranks, init, _ = run
    for k, r in enumerate(ranks):
        assert (r['rank'], r['num_processes'], r['backend'], r['ddp']) == (k, W.WORLD, 'gloo', 'DistributedDataParallel'), r['rank']
        assert r['device'].startswith('cpu')
        assert sorted(r['states']) == list(range(1, W.STEPS + 1))
        # the same seed on both ranks builds the same model, and the test process rebuilds it
        assert init.keys() == r['init'].keys()
        assert all(torch.equal(init[n], r['init'][n]) for n in init), [n for n in init if not torch.equal(init[n], r['init'][n])][:5]


def test_parameters_identical_across_ranks(run):
    ranks, init, _ = run
    for step in range(1, W.STEPS + 1):
        a, b = ranks[0]['states'][step], ranks[1]['states'][step]
        assert a.keys() == b.keys() == init.keys()
        diff = [n for n in a if not torch.equal(a[n], b[n])]
        assert not diff, f'step {step}: {len(diff)} entries differ across ranks, e.g. {diff[:5]}'
        assert int(a['step']) == step
    # training really moved the weights, step after step (students and, by the EMA, their momentum copies)
    last, prev = ranks[0]['states'][W.STEPS], ranks[0]['states'][W.STEPS - 1]
    for n in ('visual_encoder.patch_embed.proj.weight', 'text_encoder.bert.embeddings.word_embeddings.weight', 'itm_head.weight',
              'text_proj.weight', 'visual_encoder_m.patch_embed.proj.weight', 'text_encoder_m.cls.predictions.transform.dense.weight'):
        assert not torch.equal(last[n], prev[n]) and not torch.equal(last[n], init[n]), n


def test_each_rank_sees_its_shard(run):
    ranks, _, refs = run
    for k in range(W.WORLD):
        got, want = ranks[k]['batch'], refs[k]['batch']
        for n in ('image', 'input_ids', 'attention_mask', 'idx'): assert torch.equal(got[n], want[n]), (k, n)
        assert got['text'] == want['text']
    assert not set(ranks[0]['batch']['idx'].tolist()) & set(ranks[1]['batch']['idx'].tolist())


def test_step1_loss_equals_single_process_on_the_shard(run):
    ranks, _, refs = run
    for k in range(W.WORLD):
        r, ref = ranks[k], refs[k]
        assert torch.equal(r['rng'], ref['rng']), f'rank {k} did not start step 1 from the RNG state of seed_everything(seed, rank={k})'
        assert r['out']['alpha'] == ref['alpha'] == 0.4           # distillation on at step 1
        for n in LOSSES:
            assert abs(r['out'][n].item() - ref['out'][n].item()) <= 1e-5, (k, n, r['out'][n].item(), ref['out'][n].item())
    # the ranks' losses differ, so the comparison above tells the shards apart
    assert abs(ranks[0]['out']['loss'].item() - ranks[1]['out']['loss'].item()) > 1e-3
    # the trainer's logged step-1 losses are the mean over the ranks
    row = next(r for r in ranks[0]['log'] if r['step'] == 1)
    for n in LOSSES:
        assert abs(row[n] - sum(ref['out'][n].item() for ref in refs) / W.WORLD) <= 1e-5, (n, row[n])


def test_queue_after_step1_holds_both_ranks_in_rank_order(run):
    ranks, init, refs = run
    B, n = W.B, W.WORLD * W.B
    for name in ('image_queue', 'text_queue'):
        # each single-process queue holds its shard's momentum features at rows 0..B-1 (pointer 0 -> B)
        feats = [ref['queue'][name][:B] for ref in refs]
        assert (feats[0] - feats[1]).abs().max() > 1e-2           # distinguishable: a swapped order cannot pass
        want = torch.cat(feats)
        for k, r in enumerate(ranks):
            before, after = r['queue_before'][name], r['queue_after'][name]
            assert torch.equal(before, init[f'queue.{name}']), (k, name)      # the same initial queue on both ranks
            assert torch.allclose(after[:n], want, rtol=0, atol=1e-6), (k, name, (after[:n] - want).abs().max())
            assert not torch.allclose(after[:n], torch.cat(feats[::-1]), rtol=0, atol=1e-3)
            assert torch.equal(after[n:], before[n:]), (k, name)             # the rest untouched
    for k, r in enumerate(ranks):
        q = r['queue_after']
        assert q['queue_ptr'].tolist() == [n]
        assert torch.equal(q['idx_queue'][:n], torch.cat([refs[0]['batch']['idx'], refs[1]['batch']['idx']]))
        assert (q['idx_queue'][n:] == -100).all()
        # the queue entered into the step-1 state dict on both ranks is the same
        assert torch.equal(ranks[k]['states'][1]['queue.image_queue'], q['image_queue'])


def test_recipe_script_two_ranks_with_itc_warmup(tmp_path):
    """The README's two-rank command on the pre-training recipe itself, with its ITC warm-up on (during the warm-up the
    fusion layers and ITM/MLM heads get no gradient, which DDP refuses unless told; it crashed at step 2 before)."""
    from vlnb.recipes.common import load_json
    out = tmp_path / 'run'
    cmd = [str(Path(sys.executable).parent / 'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           '-m', 'vlnb.recipes.pretrain', '--n_images', '40', '--batch_size', '4', '--max_steps', '4', '--itc_warmup', '2',
           '--queue_size', '16', '--vocab_size', '300', '--k_test', '0', '--eval_max_images', '8', '--log_every', '1',
           '--out_dir', str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE='1', VLNB_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
               TOKENIZERS_PARALLELISM='false', PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f'{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    m = load_json(out / 'metrics.json')
    assert m['steps'] == 4, m
    assert load_json(out / 'config.json')['params']['itc_warmup'] == 2
