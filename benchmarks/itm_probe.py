"""Does the fused [CLS] of a pre-training read the image at all? ITM against random negatives.

Pre-training's ITM loss ends at the entropy of its 1 : 2 prior, because its negatives are the hardest the ITC
similarities find. This probe scores easy pairs instead: each val image's first caption with that image, and with the
image of the next record (a random other scene). It reports the ROC AUC of the ITM margin `logit[1] - logit[0]`
(positive against negative pairs) and the arg-max accuracy, then optionally fine-tunes ITM alone on such random
pairs (`--steps`, AdamW at `--lr`, batch 32 positives + 32 negatives) and scores again.

    python benchmarks/itm_probe.py --run ~/.cache/vlnb/pretrain/<key> --steps 400

It prints a table and writes `config.json` and `metrics.json` into `--out-dir`.
"""
import argparse, os, time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch, torch.nn.functional as F
from vlnb.core import capture_config, save_json
from vlnb.data.core import PretrainDataset, build_transform, make_collate, make_loader
from vlnb.metrics import format_table
from vlnb.recipes.common import recipe_transform
from vlnb.recipes.pretrain import load_pretrain_run


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    "P(score of a random positive > score of a random negative), ties counted half."
    d = pos[:, None] - neg[None]
    return ((d > 0).float().mean() + 0.5 * (d == 0).float().mean()).item()


def shifted(n: int, by) -> torch.Tensor: return (torch.arange(n) + by) % n


def itm_margins(model, batch, perm):
    "ITM margins `logit[1] - logit[0]` of (caption, own image) and (caption, image[perm])."
    ie, _ = model.encode_image(batch['image']); te, _ = model.encode_text(batch['input_ids'], batch['attention_mask'])
    att = batch['attention_mask']
    lo = model.itm_logits(torch.cat([te, te]), torch.cat([att, att]), torch.cat([ie, ie[perm]]))
    m = lo[:, 1] - lo[:, 0]; B = len(ie)
    return m[:B], m[B:], lo


@torch.no_grad()
def score(model, loader) -> dict:
    model.eval(); P, N = [], []
    for b in loader:
        p, n, _ = itm_margins(model, b, shifted(len(b['image']), 1)); P.append(p); N.append(n)
    model.train(); P, N = torch.cat(P), torch.cat(N)
    return dict(auc=100 * roc_auc(P, N), acc=100 * torch.cat([P > 0, N < 0]).float().mean().item(), n_pairs=len(P))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run', required=True, help='a vlnb pre-training run folder')
    ap.add_argument('--steps', type=int, default=400)
    ap.add_argument('--lr', type=float, default=1e-4)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out-dir', default='runs/bench_itm_probe')
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    pre = load_pretrain_run(args.run); model, tok, root, p = pre['model'], pre['tokenizer'], pre['root'], pre['params']
    col = make_collate('pretrain', tok)
    val = make_loader(PretrainDataset(root / 'retrieval_val.json', root, build_transform('val', p['image_size']), caption_mode='first'),
                      64, shuffle=False, collate_fn=col)
    rows = [dict(model='pre-trained', steps=0, **score(model, val))]
    if args.steps:
        train = make_loader(PretrainDataset(root / 'pretrain_train.json', root, recipe_transform('flip', p['image_size']), seed=args.seed),
                            32, shuffle=True, seed=args.seed, collate_fn=col)
        params = [q for n, q in model.named_parameters() if not any(s in n for s in ('_m.', 'queue'))]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.02)
        g = torch.Generator().manual_seed(args.seed); it, t0 = iter(train), time.perf_counter()
        for step in range(args.steps):
            try: b = next(it)
            except StopIteration: it = iter(train); b = next(it)
            B = len(b['image'])
            _, _, lo = itm_margins(model, b, shifted(B, torch.randint(1, B, (1,), generator=g)))
            loss = F.cross_entropy(lo, torch.cat([torch.ones(B), torch.zeros(B)]).long())
            opt.zero_grad(); loss.backward(); opt.step()
        rows.append(dict(model=f'+ ITM on random pairs, lr {args.lr:g}', steps=args.steps, **score(model, val),
                         train_s=round(time.perf_counter() - t0, 1)))
    print(format_table(rows, None, floatfmt='.1f'))
    save_json(capture_config(vars(args), args.seed, pretrain_params=p), os.path.join(args.out_dir, 'config.json'))
    save_json(dict(rows=rows, pretrain_loss_itm=pre['metrics'].get('loss_last', {}).get('loss_itm')), os.path.join(args.out_dir, 'metrics.json'))
    print(f'config.json and metrics.json written to {args.out_dir}')


if __name__ == '__main__':
    main()
