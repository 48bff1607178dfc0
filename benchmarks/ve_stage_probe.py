"""What did each stage of a train_ve curriculum run teach? Score its checkpoints on one kind of statement.

A `train_ve` run with `curriculum_steps` keeps two checkpoints per model: the end of the curriculum stage
(`<model>/curriculum/checkpoints`) and the end of the full mix (`<model>/checkpoints`). This probe rebuilds the run's
models from its `config.json` (the pre-training from its `pretrain_checkpoint`, else from the shared cache, as in the
recipe), loads each checkpoint and
scores the `--ops` statements (default: `exist`) per true label, on training statements the run saw and on val
statements of unseen images: the val split's own plus `--val-extra` more per val image drawn from the scene graphs
(`extra_ve_records`, the same generator as the training hypotheses), so that the rare false statements are counted in
hundreds rather than in tens.

    python benchmarks/ve_stage_probe.py --run runs/ve_conv_curr8000 --out-dir figures/results/train_ve_curriculum8000/stage_probe

It prints a table and writes `config.json` and `metrics.json` into `--out-dir`.
"""
import argparse, json, os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from vlnb.core import capture_config, save_json
from vlnb.data.core import VEDataset, build_transform, read_records
from vlnb.data.synth import extra_ve_records
from vlnb.metrics import format_table
from vlnb.recipes.common import synth_root
from vlnb.recipes.pretrain import pretrained_model
from vlnb.recipes.train_nlvr import accuracy_by_group
from vlnb.recipes.train_ve import ve_statements
from vlnb.tasks.ve import VE_CLASSES, build_ve_model, predict_ve
from vlnb.train import find_latest, load_checkpoint


def statements(records, root, tf, ops, limit=None) -> VEDataset:
    "The first `limit` of `records` whose synthetic program op is in `ops` (train_ve's `ve_statements`), transformed by `tf`."
    return VEDataset(ve_statements(VEDataset(records, root, tf), ops).records[:limit], root, tf, split='val')


def per_label(preds, labels, records) -> dict:
    "Accuracy (%) and count per true label (train_nlvr's `accuracy_by_group`), and overall."
    p = [dict(index=i, pred=VE_CLASSES[int(a)], label=VE_CLASSES[int(y)]) for i, (a, y) in enumerate(zip(preds, labels))]
    out = accuracy_by_group({'m': p}, records, lambda r: r['label'])['m']
    return dict(out, all=dict(acc=round(100 * (preds == labels).float().mean().item(), 2), n=len(labels)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run', required=True, help='a train_ve run folder made with curriculum_steps')
    ap.add_argument('--ops', default='exist', help='comma-separated statement kinds to score')
    ap.add_argument('--n-train', type=int, default=1500, help='training statements scored (the first ones)')
    ap.add_argument('--val-extra', type=int, default=20, help='more statements per val image from the scene graphs')
    ap.add_argument('--out-dir', default='runs/ve_stage_probe')
    args = ap.parse_args()
    run_cfg = json.loads(open(os.path.join(args.run, 'config.json')).read())['params']
    if not run_cfg.get('curriculum_steps'): raise SystemExit(f'{args.run}: not a curriculum run (curriculum_steps is 0)')
    if run_cfg.get('data_root'): raise SystemExit(f'{args.run}: this probe rebuilds runs on the synthetic data only')
    ops = [o.strip() for o in args.ops.split(',') if o.strip()]
    os.makedirs(args.out_dir, exist_ok=True)
    save_json(capture_config(dict(vars(args), run_params=run_cfg)), os.path.join(args.out_dir, 'config.json'))
    keys = ('method', 'preset', 'data_root', 'n_images', 'image_size', 'vocab_size', 'seed')   # as the recipe passes them
    pre = pretrained_model(run_cfg.get('pretrain_checkpoint'), run_cfg['text_encoder'], max_steps=run_cfg['pretrain_steps'],
                           mixed_precision=run_cfg['mixed_precision'], **{k: run_cfg[k] for k in keys})
    tok, root = pre['tokenizer'], synth_root(run_cfg['n_images'], run_cfg['image_size'], run_cfg['seed'], None)
    train = read_records(root / 've_train.json')
    if run_cfg['extra_hypotheses']: train += extra_ve_records(root, run_cfg['extra_hypotheses'], 'train')
    val = read_records(root / 've_val.json') + (extra_ve_records(root, args.val_extra, 'val') if args.val_extra else [])
    tf = build_transform('val', run_cfg['image_size'])
    sets = {'train (seen)': statements(train, root, tf, ops, args.n_train), 'val (unseen images)': statements(val, root, tf, ops)}
    models = [m for m in ('ve', 'blind') if os.path.isdir(os.path.join(args.run, m))]
    metrics, rows = dict(ops=ops, n={k: len(v) for k, v in sets.items()}, scores={}), []
    for m in models:
        for stage, sub in (('curriculum', os.path.join(m, 'curriculum')), ('mix', m)):
            ck = find_latest(os.path.join(args.run, sub, 'checkpoints'))
            if ck is None: raise SystemExit(f'{args.run}/{sub}: no checkpoint')
            model = build_ve_model(pre['model'], blind=m == 'blind')
            model.load_state_dict(load_checkpoint(ck)['model'])
            for name, ds in sets.items():
                p = predict_ve(model, ds, tok, batch_size=64, progress=False)
                s = per_label(p['preds'], p['labels'], ds.records)
                metrics['scores'][f'{m} / {stage} / {name}'] = s
                rows.append(dict(model=m, after=f"{stage} ({json.loads((ck / 'meta.json').read_text())['step']} steps)", statements=name,
                                 **{f'{c} right': s[c]['acc'] for c in ('entailment', 'contradiction', 'neutral') if c in s}, all=s['all']['acc']))
    save_json(metrics, os.path.join(args.out_dir, 'metrics.json'))
    print(format_table(rows))


if __name__ == '__main__': main()
