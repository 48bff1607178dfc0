"""Worker for tests/test_checkpoint_kill.py (not a test itself): trains a toy model with `vlnb.train.Trainer`, one
checkpoint per step. Checkpoint 1 is written normally; while checkpoint 2 is being written, `vlnb.train._save_file`
(the function `save_checkpoint` writes every `.pt` file with) writes only the first half of the serialised `FILE`
(model.pt or trainer.pt), fsyncs it, prints `PARTIAL <path> <written> <total>` and sleeps: the parent SIGKILLs it there.

usage: python ckpt_kill_worker.py RUN_DIR FILE NUM_THREADS"""
import io, os, sys, time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import vlnb.train as T

STEPS, SEED = 4, 0


class Toy(nn.Module):
    "A tiny regression model with dropout, so the RNG states matter."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, batch):
        x, y = batch
        return dict(loss=nn.functional.mse_loss(self.net(x).squeeze(-1), y))


def make_run(run_dir, resume=False, seed=SEED):
    "The run both the worker and the test build: 32 samples, batch 4, `STEPS` steps, a checkpoint every step."
    g = torch.Generator().manual_seed(123)
    x = torch.randn(32, 6, generator=g); y = x.sum(1) + 0.1 * torch.randn(32, generator=g)
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=4, sampler=T.EpochSampler(ds, shuffle=True, seed=7))
    torch.manual_seed(seed)
    model = Toy()
    cfg = T.TrainConfig(lr=1e-2, max_steps=STEPS, warmup_steps=1, save_every=1, keep_last=1, log_every=1, out_dir=str(run_dir),
                        seed=seed, resume=resume, progress=False, live_plot=False)
    return T.Trainer(model, loader, cfg)


class SnapshotOnSave:
    "Keep, beside the run, an independent copy of what the trainer held when it saved each step (the test's reference)."
    def __init__(self, out): self.out = Path(out)
    def on_save(self, trainer, path):
        sd = {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}
        torch.save(dict(model=sd, step=trainer.step, epoch=trainer.epoch, batch_in_epoch=trainer.batch_in_epoch,
                        optimizer=trainer.optimizer.state_dict()), self.out / f'snapshot-{trainer.step}.pt')
        print(f'SAVED {path}', flush=True)


def main(run_dir, victim, threads):
    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    real = T._save_file

    def dying_save_file(obj, path):
        path = Path(path)
        if not (path.parent.name.startswith('.tmp-ckpt-00000002') and path.name == victim): return real(obj, path)
        buf = io.BytesIO(); torch.save(obj, buf); data = buf.getvalue()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
        print(f'PARTIAL {path} {len(data) // 2} {len(data)}', flush=True)
        time.sleep(600)                       # the parent SIGKILLs us here
        raise SystemExit('not killed')

    T._save_file = dying_save_file            # save_checkpoint looks `_save_file` up at call time
    tr = make_run(run_dir)
    tr.callbacks.append(SnapshotOnSave(run_dir.parent))
    tr.fit()
    print('FINISHED', flush=True)             # never reached: the save of step 2 blocks


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
