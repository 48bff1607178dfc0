"""Does the pre-trained ViT see shapes? Probes of its patch tokens against the scene graphs.

The VQA model of the main job answers colour questions well above its blind twin and shape questions no better, and
every SNLI-VE statement names a shape. This benchmark asks whether that starts in the vision encoder. For each object
of a synthetic scene it reads the ViT's last-layer tokens at the object: the token of the patch under the object's
centre, and the mean and the max of the tokens of every patch its box touches. Two probes, for the ViT of a
pre-training run folder and for an untrained ViT of the same architecture (the run's own model, re-initialised):

- **frozen**: a linear classifier (AdamW, 500 full-batch steps on standardised features) predicts the object's shape
  (6 classes) and colour from the frozen tokens (objects of 1,500 train scenes; scored on the 300 val scenes);
- **learnable**: the whole ViT and a linear head are trained to name the shape of every object from its centre-patch
  token (batch 32 images, AdamW at `--lr`), the val accuracy every 100 steps. This measures how quickly the encoder
  *can* come to encode shape from where it starts.

    python benchmarks/vit_shape_probe.py --run ~/.cache/vlnb/pretrain/<key> --steps 1000

It prints a table and writes `config.json` and `metrics.json` into `--out-dir`.
"""
import argparse, copy, json, os, sys, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from vlnb.core import capture_config, save_json
from vlnb.data.core import build_transform
from vlnb.data.synth import SHAPES, COLOURS
from vlnb.metrics import format_table
from vlnb.recipes.pretrain import load_pretrain_run


def load_objects(root, split: str, n: int, image_size: int, patch: int):
    """Images (n, 3, H, W) of the first `n` scenes of `split` and, per image, its objects as
    `(centre patch, [patches the box touches], shape id, colour id)`; patch indices count the ViT's [CLS] as 0."""
    scenes = json.loads((Path(root) / f'scenes_{split}.json').read_text())[:n]
    tf, side = build_transform('val', image_size), image_size // patch
    ims = torch.stack([tf(dict(image=Image.open(Path(root) / s['image']).convert('RGB'), texts={}))['image'] for s in scenes])
    def cell(v): return min(side - 1, max(0, int(v // patch)))
    objs = []
    for s in scenes:
        scale = image_size / s['width']; row = []
        for o in s['objects']:
            cx, cy = (v * scale for v in o['centre']); x, y, w, h = (v * scale for v in o['box'])
            box = [1 + r * side + c for r in range(cell(y), cell(y + h) + 1) for c in range(cell(x), cell(x + w) + 1)]
            row.append((1 + cell(cy) * side + cell(cx), box, SHAPES.index(o['shape']), list(COLOURS).index(o['colour'])))
        objs.append(row)
    return ims, objs


@torch.no_grad()
def object_features(vit, ims, objs, batch: int = 100):
    "Per object: (centre token, [centre; box mean; box max]) and the shape / colour labels."
    vit.eval(); C, B, S, K = [], [], [], []
    for i in range(0, len(ims), batch):
        h = vit(ims[i:i + batch])
        for b, row in enumerate(objs[i:i + batch]):
            for p, box, shape, colour in row:
                C.append(h[b, p]); B.append(torch.cat([h[b, p], h[b, box].mean(0), h[b, box].max(0).values]))
                S.append(shape); K.append(colour)
    return torch.stack(C), torch.stack(B), torch.tensor(S), torch.tensor(K)


def linear_probe(Xtr, ytr, Xva, yva, n_classes: int, steps: int = 500, seed: int = 0) -> float:
    "Val accuracy (%) of a linear classifier trained full-batch on standardised features."
    torch.manual_seed(seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xva = (Xtr - mu) / sd, (Xva - mu) / sd
    lin = nn.Linear(Xtr.shape[1], n_classes); opt = torch.optim.AdamW(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(lin(Xtr), ytr); opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): return 100 * (lin(Xva).argmax(1) == yva).float().mean().item()


def learn_shapes(vit, train, val, steps: int, lr: float, seed: int = 0) -> list:
    "Train `vit` + a linear head on object shapes (centre-patch token); val accuracy (%) at step 0 and every 100 steps."
    torch.manual_seed(seed)
    head = nn.Linear(vit.embed_dim, len(SHAPES))
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr, weight_decay=0.02)
    g = torch.Generator().manual_seed(seed)
    def logits_labels(ims, objs, idx):
        h = vit(ims[idx])
        k, p, y = zip(*[(k, p, s) for k, i in enumerate(idx.tolist()) for p, _, s, _ in objs[i]])
        return head(h[torch.tensor(k), torch.tensor(p)]), torch.tensor(y)
    def val_acc():
        vit.eval()
        with torch.no_grad(): lo, y = logits_labels(*val, torch.arange(len(val[0])))
        vit.train(); return 100 * (lo.argmax(1) == y).float().mean().item()
    curve = [(0, val_acc())]
    vit.train()
    for step in range(1, steps + 1):
        lo, y = logits_labels(*train, torch.randint(len(train[0]), (32,), generator=g))
        loss = F.cross_entropy(lo, y); opt.zero_grad(); loss.backward(); opt.step()
        if step % 100 == 0: curve.append((step, val_acc()))
    return curve


def reinit(module: nn.Module) -> nn.Module:
    "A copy of `module` with every sub-module's own `reset_parameters` re-drawn, and its CLS / position embeddings at std 0.02."
    m = copy.deepcopy(module)
    for sub in m.modules():
        if sub is not m and hasattr(sub, 'reset_parameters'): sub.reset_parameters()
    for name in ('cls_token', 'pos_embed'):
        p = getattr(m, name, None)
        if isinstance(p, nn.Parameter): nn.init.trunc_normal_(p, std=0.02)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run', required=True, help='a vlnb pre-training run folder (e.g. one under ~/.cache/vlnb/pretrain)')
    ap.add_argument('--steps', type=int, default=1000, help='steps of the learnable probe')
    ap.add_argument('--lr', type=float, default=3e-4)
    ap.add_argument('--train-scenes', type=int, default=1500, help='train scenes of the frozen probe (the learnable one uses 2,400)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out-dir', default='runs/bench_vit_shape_probe')
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    pre = load_pretrain_run(args.run)
    p = pre['params']; vit0 = pre['model'].visual_encoder
    patch = vit0.patch_size[0]
    tr = load_objects(pre['root'], 'train', 2400, p['image_size'], patch)
    va = load_objects(pre['root'], 'val', 300, p['image_size'], patch)
    rows = []
    for name, vit in (('pre-trained', vit0), ('untrained', reinit(vit0))):
        t0 = time.perf_counter()
        Ctr, Btr, Str, Ktr = object_features(vit, tr[0][:args.train_scenes], tr[1][:args.train_scenes])
        Cva, Bva, Sva, Kva = object_features(vit, *va)
        row = dict(vit=name,
                   shape_centre=linear_probe(Ctr, Str, Cva, Sva, len(SHAPES)), shape_box=linear_probe(Btr, Str, Bva, Sva, len(SHAPES)),
                   colour_centre=linear_probe(Ctr, Ktr, Cva, Kva, len(COLOURS)), colour_box=linear_probe(Btr, Ktr, Bva, Kva, len(COLOURS)))
        curve = learn_shapes(copy.deepcopy(vit), tr, va, args.steps, args.lr, args.seed)
        row.update({f'learn@{s}': a for s, a in curve if s in (0, 300, args.steps // 2, args.steps)}, curve=curve,
                   seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
    n_val = sum(len(r) for r in va[1])
    majority = 100 * max(sum(o[2] == k for r in va[1] for o in r) for k in range(len(SHAPES))) / n_val
    cols = [c for c in rows[0] if c not in ('curve',)]
    print(format_table(rows, cols, floatfmt='.1f'))
    print(f'val objects: {n_val}; majority shape {majority:.1f}%')
    save_json(capture_config(vars(args), args.seed, pretrain_params=p, pretrain_zero_shot=pre['metrics'].get('zero_shot_after')),
              os.path.join(args.out_dir, 'config.json'))
    save_json(dict(rows=rows, majority_shape=majority, n_val_objects=n_val), os.path.join(args.out_dir, 'metrics.json'))
    print(f'config.json and metrics.json written to {args.out_dir}')


if __name__ == '__main__':
    main()
