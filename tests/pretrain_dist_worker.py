"""Worker for tests/test_pretrain_dist.py (not a test itself): ALBEF pre-training with `vlnb.train.Trainer` on two CPU
ranks started by a real `accelerate launch --multi_gpu --num_processes 2 ...` (the accelerator comes from
`vlnb.core.get_accelerator`, whose CPU detection makes the two processes one gloo process group).

The run is the pre-training recipe's (`vlnb.recipes.pretrain`: synthetic data, WordPiece tokenizer, `EpochLoader`
sharded over the ranks, `Trainer`) at a much smaller size, with momentum distillation and the feature queue active from
step 1 (`distill=True`, `itc_warmup_steps=0`, `alpha_warmup_steps=0`). Each rank writes `OUT_DIR/rank<r>.pt`:
its initial weights, the batch of its first forward and the global torch RNG state at that forward's entry (dropout,
ITM hard negatives and MLM masking all draw from it: the trainer passes no `generator`), the loss parts of that forward,
the queue after step 1, its full state dict after every step, and (rank 0) the trainer's log rows.

usage: accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
           tests/pretrain_dist_worker.py OUT_DIR        (VLNB_CACHE must hold the data `make_parts` builds)"""
import sys
from pathlib import Path

import torch

SEED, IMG, N_IMAGES, VOCAB = 0, 32, 40, 1000
B, STEPS = 4, 3                 # per-rank batch; optimizer steps (>= 2: parameters must stay identical across ranks)
WORLD = 2
QUEUE = 3 * WORLD * B           # a multiple of the global batch, larger than it so untouched rows stay visible


def make_parts():
    "`(tokenizer, train dataset, collate)` exactly as the pre-training recipe builds them, on a small synthetic dataset."
    from vlnb.recipes.common import synth_root, recipe_tokenizer
    from vlnb.recipes.pretrain import pretrain_data
    root = synth_root(N_IMAGES, IMG, SEED)
    tok = recipe_tokenizer(root, VOCAB)
    train, collate, _ = pretrain_data(root, tok, IMG, augment='flip', eval_max_images=8, seed=SEED)
    return tok, train, collate


def make_model(tok):
    "A shrunken 'tiny' ALBEF, seeded: every process that calls this gets the same initial weights and queues."
    from vlnb.core import seed_everything
    from vlnb.methods.albef import albef_config, build_albef
    from vlnb.models.vision import vision_config
    seed_everything(SEED)
    cfg = albef_config('tiny', vision=vision_config('tiny', img_size=IMG, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                       text=dict(preset='tiny', hidden_size=32, num_hidden_layers=2, fusion_layer=1, num_attention_heads=2,
                                 intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),  # BERT's dropout (the
                       # tiny preset has none): the RNG-state checks must cover dropout
                       embed_dim=16, queue_size=QUEUE, distill=True, itc_warmup_steps=0, alpha_warmup_steps=0, alpha=0.4)
    return build_albef(cfg, tokenizer=tok)


def make_loader_fn(train, collate):
    from vlnb.data.core import EpochLoader
    return EpochLoader(train, B, shuffle=True, seed=SEED, collate_fn=collate, drop_last=True)


def train_config():
    from vlnb.train import TrainConfig
    return TrainConfig(lr=1e-3, max_steps=STEPS, warmup_steps=0, schedule='constant', log_every=1, out_dir=None, seed=SEED,
                       progress=False, live_plot=False)


def _clone(x):
    if isinstance(x, torch.Tensor): return x.detach().clone().cpu()
    if isinstance(x, dict): return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return type(x)(_clone(v) for v in x)
    return x


def _state(model):
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


class Recorder:
    "Forward hooks on the ALBEF module (inside DDP) and a trainer callback that keep what this rank saw."
    def __init__(self, model):
        self.model, self.rec, self.states = model, {}, {}
        model.register_forward_pre_hook(self.pre)
        model.register_forward_hook(self.post)

    def pre(self, module, args):
        if int(module.step) == 0:           # the first training forward: step 1
            self.rec.update(batch=_clone(args[0]), rng=torch.get_rng_state(), queue_before=_clone(dict(module.queue.named_buffers())))

    def post(self, module, args, out):
        if int(module.step) == 1 and 'out' not in self.rec:
            self.rec['out'] = {k: _clone(getattr(out, k)) for k in ('loss', 'loss_itc', 'loss_itm', 'loss_mlm', 'alpha')}
            self.rec['queue_after'] = _clone(dict(module.queue.named_buffers()))

    def on_step_end(self, trainer):
        self.states[trainer.step] = _state(trainer.unwrapped_model)


def main(out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from vlnb.core import get_accelerator
    from vlnb.train import Trainer
    acc = get_accelerator()
    rank = acc.process_index
    if acc.num_processes != WORLD or not dist.is_initialized() or dist.get_world_size() != WORLD:
        raise SystemExit(f'expected {WORLD} ranks in one process group, got num_processes={acc.num_processes}, '
                         f'initialised={dist.is_initialized()}')
    tok, train, collate = make_parts()
    model = make_model(tok)
    init = _state(model)
    rec = Recorder(model)
    trainer = Trainer(model, make_loader_fn(train, collate), train_config(), accelerator=acc, callbacks=[rec])
    trainer.fit()
    torch.save(dict(rank=rank, num_processes=acc.num_processes, device=str(acc.device), backend=dist.get_backend(),
                    ddp=type(trainer.model).__name__, init=init, states=rec.states, log=list(trainer.log.rows), **rec.rec),
               Path(out_dir) / f'rank{rank}.pt')
    acc.wait_for_everyone()


if __name__ == '__main__':
    main(sys.argv[1])
