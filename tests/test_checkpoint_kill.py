"""Checkpoints of `vlnb.train` survive a real SIGKILL in the middle of a write, and resuming ALBEF itself (momentum
encoders, queues, EMA, alpha ramp, ITC warm-up, RNG, data position) is bit-exact on the CPU."""
import os, signal, subprocess, sys, threading
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vlnb.train as T                                      # noqa: E402
from ckpt_kill_worker import make_run, STEPS               # noqa: E402


@pytest.fixture
def one_thread():
    "One intra-op thread (restored after): much faster on a small, busy CPU; both runs of a comparison use the same count."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _same(a: dict, b: dict) -> list:
    "Names of the entries of two state dicts that differ (keys, dtype, shape or any value); [] when bit-identical."
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)): bad.append(k)
    return bad


def _same_tree(a, b) -> bool:
    "Deep, bit-exact equality of nested dicts/lists of tensors and plain values (an optimizer state dict)."
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_tree, a, b))
    return a == b


def _kill_during_save(tmp_path: Path, victim: str):
    "Run the worker until it is half-way through writing `victim` of checkpoint 2, SIGKILL it; (run_dir, partial path, sizes)."
    run = tmp_path / 'run'
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    p = subprocess.Popen([sys.executable, str(HERE / 'ckpt_kill_worker.py'), str(run), victim, str(torch.get_num_threads())],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent)
    lines, watchdog = [], threading.Timer(120, p.kill)       # a hung worker ends the read loop below (and fails the test)
    watchdog.start()
    try:
        for line in iter(p.stdout.readline, ''):                # '' once the worker has exited
            lines.append(line)
            if line.startswith('PARTIAL'): break
        assert lines and lines[-1].startswith('PARTIAL'), f'worker ended early:\n{"".join(lines)}\n{p.stderr.read()}'
        p.send_signal(signal.SIGKILL)                           # in the middle of the write of checkpoint 2
        assert p.wait(30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if p.poll() is None: p.kill(); p.wait()
        p.stdout.close(); p.stderr.close()
    _, partial, written, total = lines[-1].split()
    return run, Path(partial), int(written), int(total), lines


@pytest.mark.parametrize('victim', ['model.pt', 'trainer.pt'])
def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, victim, one_thread):
    run, partial, written, total, lines = _kill_during_save(tmp_path, victim)
    ck_dir = run / 'checkpoints'
    assert any(l.startswith('SAVED') and l.rstrip().endswith('ckpt-00000001') for l in lines), lines
    # the kill really happened mid-write: a half file in the hidden temp folder of step 2, nothing named ckpt-2
    tmp = partial.parent
    assert tmp.parent == ck_dir and tmp.name.startswith('.tmp-ckpt-00000002-') and tmp.is_dir()
    assert partial.stat().st_size == written and 0 < written < total
    with pytest.raises(Exception): torch.load(partial, weights_only=False)
    assert not (ck_dir / 'ckpt-00000002').exists()
    assert (ck_dir / 'latest').read_text().strip() == 'ckpt-00000001'

    # the lookup the trainer uses finds checkpoint 1 and ignores the temp folder
    assert T.list_checkpoints(ck_dir) == [ck_dir / 'ckpt-00000001']
    assert T.find_latest(ck_dir) == ck_dir / 'ckpt-00000001'
    (ck_dir / 'latest').unlink()                                # even without the pointer, the partial save is never picked
    assert T.find_latest(ck_dir) == ck_dir / 'ckpt-00000001'
    (ck_dir / 'latest').write_text('ckpt-00000001')
    with pytest.raises(FileNotFoundError, match='not a complete checkpoint'): T.load_checkpoint(tmp)

    # checkpoint 1 loads (through a run folder too) and holds exactly what the worker's trainer had at step 1
    ref = torch.load(tmp_path / 'snapshot-1.pt', weights_only=False)
    assert ref['step'] == 1
    for where in (ck_dir / 'ckpt-00000001', run):
        ck = T.load_checkpoint(where)
        assert ck['path'] == ck_dir / 'ckpt-00000001'
        assert ck['meta']['step'] == 1 and ck['trainer']['step'] == 1
        assert (ck['trainer']['epoch'], ck['trainer']['batch_in_epoch']) == (ref['epoch'], ref['batch_in_epoch']) == (0, 1)
        assert _same(ck['model'], ref['model']) == []
        assert _same_tree(ck['trainer']['optimizer'], ref['optimizer'])

    # a new trainer (different init and seed: everything must come from the checkpoint) resumes at step 1 ...
    tr = make_run(run, resume='auto', seed=99)
    assert tr.resumed_from == ck_dir / 'ckpt-00000001' and tr.step == 1
    assert (tr.epoch, tr.batch_in_epoch) == (0, 1)
    assert _same(tr.unwrapped_model.state_dict(), ref['model']) == []
    assert _same_tree(tr.optimizer.state_dict(), ref['optimizer'])
    # ... and continues exactly as a run that was never killed
    tr.fit()
    straight = make_run(tmp_path / 'straight').fit()
    assert tr.step == straight.step == STEPS
    assert _same(tr.unwrapped_model.state_dict(), straight.unwrapped_model.state_dict()) == []
    assert [r['loss'] for r in T.read_log(run)] == [r['loss'] for r in T.read_log(tmp_path / 'straight')]
    # the next successful save cleaned up the killed save's temp folder; keep_last=1 kept only the newest
    assert not tmp.exists() and not list(ck_dir.glob('.tmp-*'))
    assert T.list_checkpoints(ck_dir) == [ck_dir / f'ckpt-{STEPS:08d}'] == [T.find_latest(ck_dir)]


# ---- ALBEF: N steps straight == N/2 steps, stop, resume in a new trainer, N/2 steps ------------------------------------
N, HALF, BATCH, WARM, QUEUE = 6, 3, 4, 2, 8      # steps, stop, batch, ITC warm-up steps, queue length


def _albef_run(run_dir, init_seed: int = 0, resume=False):
    "The pre-training recipe's pieces (data, tokenizer, model, loader, alpha ramp) at a tiny size, on a `Trainer` with checkpoints."
    from vlnb.core import seed_everything
    from vlnb.data.core import EpochLoader
    from vlnb.recipes.common import synth_root, recipe_tokenizer
    from vlnb.recipes.pretrain import pretrain_data, build_model
    root = synth_root(n_images=20, image_size=32, seed=0)        # 16 training pairs: 4 batches of 4 per epoch
    tok = recipe_tokenizer(root, vocab_size=200)
    train, collate, _ = pretrain_data(root, tok, image_size=32, augment='flip', eval_max_images=4, seed=0)
    seed_everything(init_seed)
    model = build_model('albef', 'tiny', tok, 32, queue_size=QUEUE, temp=0.3, itc_pool='mean', itc_warmup_steps=WARM, distill=True)
    loader = EpochLoader(train, BATCH, shuffle=True, seed=0, collate_fn=collate, drop_last=True)
    model.alpha_warmup_steps = min(len(loader), max(N - WARM, 1))   # as run_pretrain: the ramp spans the stop
    cfg = T.TrainConfig(lr=1e-3, weight_decay=0.02, max_steps=N, warmup_steps=2, min_lr=1e-5, log_every=1, out_dir=str(run_dir),
                        seed=0, resume=resume, progress=False, live_plot=False)
    return T.Trainer(model, loader, cfg, callbacks=[_Alphas()])


class _Alphas:
    "Records, after each step, the distillation weight and ITC warm-up flag the model will use on the next one."
    def __init__(self): self.rows = []
    def on_step_end(self, tr):
        m = tr.unwrapped_model
        self.rows.append((tr.step, m.in_itc_warmup(), m.current_alpha()))


def test_albef_resume_is_bit_exact(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv('VLNB_CACHE', str(tmp_path / 'cache'))
    a = _albef_run(tmp_path / 'a')
    assert len(a.train_loader if a.train_loader is not None else a._loader_fn) == 4
    a.fit()
    sa = a.unwrapped_model.state_dict()
    assert a.step == N and int(sa['step']) == N

    b = _albef_run(tmp_path / 'b')
    b.fit(until_step=HALF)                                        # the trainer's own stop: checkpoint at step HALF
    assert (b.step, b.epoch, b.batch_in_epoch) == (HALF, 0, HALF)
    assert T.find_latest(tmp_path / 'b' / 'checkpoints').name == f'ckpt-{HALF:08d}'
    mid = {k: v.clone() for k, v in b.unwrapped_model.state_dict().items()}
    del b

    # a new model with another initialisation (and other RNG draws) that must take everything from the checkpoint
    c = _albef_run(tmp_path / 'b', init_seed=1, resume='auto')
    assert c.resumed_from.name == f'ckpt-{HALF:08d}' and c.step == HALF and (c.epoch, c.batch_in_epoch) == (0, HALF)
    assert _same(c.unwrapped_model.state_dict(), mid) == []
    assert c.total_steps == a.total_steps and [c.lr(s) for s in range(N)] == [a.lr(s) for s in range(N)]
    m = c.unwrapped_model
    assert not m.in_itc_warmup() and 0 < m.current_alpha() < m.alpha    # resumed in the middle of the alpha ramp
    c.fit()
    assert c.callbacks[0].rows == a.callbacks[0].rows[HALF:]
    assert [w for _, w, _ in a.callbacks[0].rows] == [s < WARM for s in range(1, N + 1)] and a.callbacks[0].rows[-1][2] == m.alpha
    sc = c.unwrapped_model.state_dict()

    # the run crossed the ITC warm-up, the alpha ramp, an epoch boundary and wrapped the queue
    assert c.step == N and c.epoch == 1
    assert sa['queue.queue_ptr'].item() == (N * BATCH) % QUEUE and N * BATCH > QUEUE
    assert any(k.startswith('visual_encoder_m.') for k in sa) and any(k.startswith('text_encoder_m.') for k in sa)
    for k in ('queue.image_queue', 'queue.text_queue', 'queue.idx_queue', 'queue.queue_ptr', 'step', 'temp'): assert k in sa, k
    assert _same(sa, sc) == []                                    # every parameter and buffer, bit for bit
    assert _same_tree(a.optimizer.state_dict(), c.optimizer.state_dict())
    ra, rc = T.read_log(tmp_path / 'a'), T.read_log(tmp_path / 'b')
    assert [r['step'] for r in rc] == [r['step'] for r in ra] == list(range(1, N + 1))
    for key in ('loss', 'loss_itc', 'loss_itm', 'loss_mlm', 'lr'): assert [r[key] for r in rc] == [r[key] for r in ra], key
