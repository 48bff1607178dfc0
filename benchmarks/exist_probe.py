"""Can the text+fusion stack learn "Is there a <red> <circle>?" at all? Existence questions with perfect vision.

Existence (and the counting, comparison, NLVR2 and SNLI-VE statements built on it) stays at the blind level in every
VQA run, even with the oracle scene-graph tokens of `oracle_vqa.py`. This probe isolates that one skill. Each row
trains a small yes/no model on existence questions over the oracle object tokens (one token per object: embeddings
of its shape, colour, size and material plus a linear map of its centre, and a learned [CLS] token) with plain BCE,
AdamW at a constant learning rate, batch 32. It then reports yes/no accuracy on the recipe's val existence questions
(by the number of attributes the question names) and on 800 of its own training questions.

Models (`--model`):
- `reader`: one cross-attention (`nn.MultiheadAttention`, 4 heads) from a text query over the object tokens, then an
  MLP. The text query is the mean of the question's word embeddings (`--text bow`) or the [CLS] output of
  `--layers` `nn.TransformerEncoderLayer`s (`--text transformer`);
- `bert`: vlnb's own `BertModel` (the `tiny` preset, `--bert` JSON overrides) reading the object tokens through its
  fusion layers; the MLP reads the fused [CLS].

Training data (`--data`): the recipe's own existence questions (`recipe`, about 1,500), or `--fresh K` new existence
questions per training image drawn with the generator's own `_q_exist` (`fresh`, 72,000 for K=30), so that a model
cannot pass by memorising.

    python benchmarks/exist_probe.py --model reader --text bow --data fresh --steps 3000
    python benchmarks/exist_probe.py --model bert --data fresh --steps 3000 --lr 3e-4

It prints one table row and writes `config.json` and `metrics.json` into `--out-dir`.
"""
import argparse, collections, json, os, sys, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).parent))
from oracle_vqa import scene_table
from vlnb.core import capture_config, save_json
from vlnb.data.core import read_records
from vlnb.data.synth import SynthConfig, _q_exist, load_scenes
from vlnb.metrics import format_table
from vlnb.models.bert import BertModel, bert_config
from vlnb.recipes.common import recipe_tokenizer, synth_root


def encode(records, tok, table, max_length=16):
    "(input_ids, image row in `table`, yes label) of existence records; the label is the majority of the 10 answers."
    ids = tok([r['question'] for r in records], padding='max_length', max_length=max_length, truncation=True, return_tensors='pt')['input_ids']
    img = torch.tensor([table['index'][r['image']] for r in records])
    y = torch.tensor([float(sum(a == 'yes' for a in r['answer']) > 5) for r in records])
    return ids, img, y


def fresh_questions(root, per_image: int, seed: int = 1) -> list:
    "`per_image` new existence questions on every training scene, from the generator's own `_q_exist`."
    cfg, rng, out = SynthConfig(n_images=3000, image_size=64), np.random.default_rng(seed), []
    for path, scene in load_scenes(root, 'train').items():
        for _ in range(per_image):
            q = _q_exist(scene, rng, cfg)
            if q: out.append(dict(question=q[0], image=path, answer=[q[1]] * 10, program=q[2], question_type='exist'))
    return out


class ObjectTokens(nn.Module):
    "Oracle image tokens: `[CLS] + one token per object` (attribute embeddings + linear centre), and their mask."
    def __init__(self, table, width):
        super().__init__()
        self.table = table
        self.emb = nn.ModuleList([nn.Embedding(n + 1, width) for n in table['n_values']])
        self.pos, self.cls = nn.Linear(2, width), nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, img):
        a, c, m = self.table['attrs'][img], self.table['centres'][img], self.table['mask'][img]
        x = sum(e(a[..., k]) for k, e in enumerate(self.emb)) + self.pos(c)
        return torch.cat([self.cls.expand(len(x), 1, -1), x[:, 1:]], 1), m


class Reader(nn.Module):
    "One cross-attention from a text query (bag of words or a transformer's [CLS]) over the object tokens, then an MLP."
    def __init__(self, table, n_vocab, pad_id, width=128, text='bow', layers=1):
        super().__init__()
        self.objects, self.pad_id, self.text = ObjectTokens(table, width), pad_id, text
        self.words = nn.Embedding(n_vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if text == 'transformer' else None
        self.xattn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, ids, img):
        x, m = self.objects(img); keep = ids != self.pad_id
        if self.text == 'bow': q = ((self.words(ids) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))[:, None]
        else: q = self.encoder(self.words(ids), src_key_padding_mask=~keep)[:, :1]
        o, _ = self.xattn(q, x, x, key_padding_mask=m == 0)
        return self.head((o + q)[:, 0])[:, 0]


class BertReader(nn.Module):
    "vlnb's `BertModel` (tiny preset + overrides) over the object tokens; an MLP on the fused [CLS]."
    def __init__(self, table, tok, width=128, bert=None, word_std=None):
        super().__init__()
        self.objects, self.pad_id = ObjectTokens(table, width), tok.pad_token_id
        self.bert = BertModel(bert_config('tiny', tokenizer=tok, **(bert or {})))
        if word_std is not None: nn.init.normal_(self.bert.embeddings.word_embeddings.weight, 0, word_std)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, ids, img):
        x, m = self.objects(img)
        o = self.bert(ids, attention_mask=(ids != self.pad_id).long(), encoder_hidden_states=x,
                      encoder_attention_mask=m.long()).last_hidden_state
        return self.head(o[:, 0])[:, 0]


def accuracy(model, data, records=None):
    "Yes/no accuracy (%), overall and by the number of attributes the question names (when `records` are given)."
    with torch.no_grad(): ok = ((model(data[0], data[1]) > 0).float() == data[2]).float()
    out = {'acc': 100 * ok.mean().item()}
    if records is not None:
        by = collections.defaultdict(list)
        for r, v in zip(records, ok.tolist()): by[len(r['program']['filter'])].append(v)
        out.update({f'{k} attr': 100 * sum(v) / len(v) for k, v in sorted(by.items())})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='reader', choices=['reader', 'bert'])
    ap.add_argument('--text', default='bow', choices=['bow', 'transformer'], help='reader only: the text query')
    ap.add_argument('--layers', type=int, default=1, help='reader only: transformer layers of the text side')
    ap.add_argument('--bert', default='', help='bert only: JSON overrides of the tiny preset')
    ap.add_argument('--word-std', type=float, default=None, help='bert only: re-draw the word embeddings at this std')
    ap.add_argument('--data', default='fresh', choices=['fresh', 'recipe'])
    ap.add_argument('--fresh', type=int, default=30, help='fresh questions per training image')
    ap.add_argument('--steps', type=int, default=3000)
    ap.add_argument('--lr', type=float, default=3e-4)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out-dir', default='runs/bench_exist_probe')
    args = ap.parse_args()
    root = synth_root(3000, 64, 0, None)
    tok, table = recipe_tokenizer(root, 1000, None), scene_table(root, 64)
    val_recs = [r for r in read_records(root / 'vqa_val.json') if r['question_type'] == 'exist']
    train_recs = fresh_questions(root, args.fresh) if args.data == 'fresh' else \
        [r for r in read_records(root / 'vqa_train.json') if r['question_type'] == 'exist']
    tr, va = encode(train_recs, tok, table), encode(val_recs, tok, table)
    torch.manual_seed(args.seed)
    model = Reader(table, len(tok), tok.pad_token_id, text=args.text, layers=args.layers) if args.model == 'reader' else \
        BertReader(table, tok, bert=json.loads(args.bert) if args.bert else None, word_std=args.word_std)
    opt = torch.optim.AdamW(model.parameters(), args.lr)
    g = torch.Generator().manual_seed(args.seed); t0 = time.perf_counter(); losses = []
    for step in range(args.steps):
        i = torch.randint(len(tr[0]), (32,), generator=g)
        loss = F.binary_cross_entropy_with_logits(model(tr[0][i], tr[1][i]), tr[2][i])
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    secs = time.perf_counter() - t0
    model.eval()
    desc = args.model + (f' {args.text}' + (f'x{args.layers}' if args.text == 'transformer' else '') if args.model == 'reader' else
                         (f' {args.bert}' if args.bert else '') + (f' word_std={args.word_std:g}' if args.word_std is not None else ''))
    row = dict(model=desc, data=f'{args.data} ({len(train_recs)})', steps=args.steps, lr=f'{args.lr:g}', train_s=round(secs, 1),
               loss_first100=float(np.mean(losses[:100])), loss_last100=float(np.mean(losses[-100:])),
               train_acc=accuracy(model, tuple(t[:800] for t in tr))['acc'], **{f'val {k}': v for k, v in accuracy(model, va, val_recs).items()})
    print(format_table([row], list(row), floatfmt='.1f'))
    save_json(capture_config(vars(args), args.seed), os.path.join(args.out_dir, 'config.json'))
    save_json(dict(rows=[row], n_val=len(val_recs)), os.path.join(args.out_dir, 'metrics.json'))
    print(f'config.json and metrics.json written to {args.out_dir}')


if __name__ == '__main__':
    main()
