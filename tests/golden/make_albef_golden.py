"""Write the ALBEF golden files used by tests/test_parity_albef.py, by running the *official* ALBEF code.

The official code (github.com/salesforce/ALBEF) is not part of vlnb and is never committed: this script imports it
from a folder given on the command line (or the ALBEF_SRC environment variable) holding its `models/` package, and
runs in a separate virtualenv (torch 2.14.1, torchvision 0.29.1, transformers 4.30.2, timm 0.4.12, ruamel.yaml).

    /work/albef_env/bin/python tests/golden/make_albef_golden.py --albef /work/albef_src --out tests/golden

What it does (see tests/golden/README.md for the record of a run):
1. builds their pre-training `ALBEF` (models/model_pretrain.py) at a tiny size (the ViT constructor's size arguments
   are overridden from here; the BERT comes from a tiny config.json + random weights saved with `save_pretrained`),
   random weights from a fixed seed, every parameter perturbed so that no weight sits at a default init value and
   the momentum copies differ from the students;
2. runs one training forward on fixed inputs and records what their forward drew (the ITM hard negatives, by
   wrapping `torch.multinomial`; the MLM masks, by wrapping `model.mask`) and what it computed (ViT tokens, text
   states, projected features, ITM logits, MLM logits, the three losses, the queues / momentum weights after the
   step), plus the ITM logits of every (image, text) pair of the batch in eval mode;
3. builds their retrieval `ALBEF` (models/model_retrieval.py) at a higher image resolution, loads the pre-training
   checkpoint into it as their Retrieval.py does (position embeddings interpolated, `bert.` stripped), sets a
   non-trivial `idx_queue`, and records the same quantities for a batch with repeated image ids;
4. at the task size (a 12-layer BERT with fusion_layer 6, as their task code hard-codes bert-base's depths; text and
   image 8 wide) builds a pre-training `ALBEF` and starts the tasks from it as their scripts do: model_vqa.py as VQA.py
   loads it (decoder = embeddings, MLM head and encoder layers 6..11), model_pretrain_nlvr.py as Pretrain_nlvr.py
   loads it (fusion layers duplicated) and model_nlvr.py from that TA checkpoint as NLVR.py loads it, model_ve.py as
   VE.py loads it; records the task outputs at that start, perturbs every weight ("fine-tuned") and records VQA's
   `rank_answer` (top-k ids and probabilities, and the first-token logits / re-ranking log-probabilities it computed
   on the way), the weighted answer loss, NLVR2 / SNLI-VE logits, fused [CLS] states and losses, and the TA logits of
   fixed image pairs. Text goes through their own tokenizer (`models/tokenization_bert.py`: `[CLS] text`, no `[SEP]`;
   VQA answers get `[SEP]` from `eos`);
5. saves `albef_pretrain_tiny.pth`, `albef_retrieval_tiny.pth`, `albef_task_pretrain_tiny.pth`, `albef_vqa_tiny.pth`,
   `albef_nlvr_ta_tiny.pth`, `albef_nlvr_tiny.pth`, `albef_ve_tiny.pth` (`{'model': state_dict}` as the released
   checkpoints; the task files without their momentum copies, whose names are checked here and recorded in the meta;
   tensors packed into one storage per dtype to keep the files small) and `albef_golden.pt` (inputs, draws, outputs,
   sizes).

Adding a task is one more `run_<task>` function below that builds their model the same way (`tiny_vit` /
`tiny_bert_dir`), loads the pre-training state dict as their task script does, records inputs and outputs into
`golden['<task>']`, and saves `albef_<task>_tiny.pth`.
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

# ---- the tiny configuration (mirrored, explicitly, in tests/test_parity_albef.py) -----------------------------------
TINY_VIT = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_BERT = dict(architectures=['BertForMaskedLM'], attention_probs_dropout_prob=0.0, hidden_act='gelu',
                 hidden_dropout_prob=0.0, hidden_size=12, initializer_range=0.02, intermediate_size=24,
                 layer_norm_eps=1e-12, max_position_embeddings=12, model_type='bert', num_attention_heads=2,
                 num_hidden_layers=4, pad_token_id=0, type_vocab_size=2, vocab_size=50, fusion_layer=2, encoder_width=16)
TOKENS = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
PRETRAIN = dict(image_res=16, vision_width=16, embed_dim=8, temp=0.07, mlm_probability=0.5, queue_size=16,
                momentum=0.995, alpha=0.4)
RETRIEVAL = dict(image_res=24, vision_width=16, embed_dim=8, temp=0.07, queue_size=16, momentum=0.995, alpha=0.4,
                 distill=True)
B, L = 4, 8
LENGTHS = [8, 6, 7, 5]
# a 50-token vocabulary for their BertTokenizer (ids as TOKENS; [UNK] 4, then the words w5 ... w49)
VOCAB = ['[PAD]', '[CLS]', '[SEP]', '[MASK]', '[UNK]'] + [f'w{i}' for i in range(5, 50)]

# ---- the task configuration ---------------------------------------------------------------------------------------
# Their task models hard-code the bert-base depths: model_vqa.py builds a 6-layer decoder, VQA.py maps encoder layers
# 6..11 onto it, model_nlvr.py / model_pretrain_nlvr.py build 18 layers and tie layers 6+2i, 7+2i (i < 6). So the task
# models use a 12-layer BERT with fusion_layer 6 (as bert-base); the decoder cross-attends to the question states with
# their `encoder_width`, so text and image widths are equal (8). A pre-training model of that size starts them all,
# loaded as their task scripts load ALBEF.pth.
TASK_VIT = dict(patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)
TASK_BERT = dict(TINY_BERT, hidden_size=8, intermediate_size=16, num_hidden_layers=12, num_attention_heads=2,
                 fusion_layer=6, encoder_width=8)
TASK_PRETRAIN = dict(image_res=12, vision_width=8, embed_dim=8, temp=0.07, mlm_probability=0.15, queue_size=16,
                     momentum=0.995, alpha=0.4)
TASK = dict(image_res=16, distill=True, alpha=0.4, eos='[SEP]')
QUESTIONS = ['w11 w23 w7 w40', 'w8 w8 w31', 'w45 w12 w19 w26 w5']      # VQA questions (their tokenizer, padding='longest')
ANSWERS = ['w9', 'w14 w6', 'w30', 'w21 w22 w33', 'w9 w10', 'w41', 'w17 w6', 'w48', 'w27 w13', 'w36']
TRAIN_ANSWERS = [['w9', 'w30'], ['w14 w6'], ['w41', 'w17 w6', 'w36']]  # VQA training: answers per question, weights below
TRAIN_WEIGHTS = [[0.7, 0.3], [1.0], [0.5, 0.3, 0.2]]
K_TEST = 4
PAIR_TEXTS = ['w5 w6 w7 w8 w9 w10', 'w20 w21', 'w30 w31 w32 w33']        # NLVR2 / SNLI-VE / TA sentences
NLVR_TARGETS, VE_TARGETS = [1, 0, 1], [2, 0, 1]
TA_PAIRS = ([0, 2, 1], [1, 0, 2])                                        # TA: image index of slot 0 and slot 1 per caption
FINETUNE_NOISE = 0.15      # N(0, s²) on every weight of a task model after loading: "fine-tuned", inputs matter more


def import_official(src: Path):
    "Import their `models` package from `src`, after the two adjustments ENVIRONMENT.md describes."
    import transformers.file_utils as fu
    fu.add_code_sample_docstrings = lambda *a, **k: (lambda f: f)   # their decorator call fails on transformers 4.30
    sys.path.insert(0, str(src))
    import models.vit, models.xbert, models.model_pretrain, models.model_retrieval  # noqa: E401
    import models.model_vqa, models.model_nlvr, models.model_ve, models.model_pretrain_nlvr, models.tokenization_bert  # noqa: E401
    import torch.distributed as dist
    if not dist.is_initialized():                                   # their queues all-gather the momentum features
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1'); os.environ.setdefault('MASTER_PORT', '29533')
        dist.init_process_group('gloo', rank=0, world_size=1)
    return models


def tiny_vit(VisionTransformer, size: dict = TINY_VIT):
    "Their ViT constructor with the size arguments (hard-coded to ViT-B/16 in their models) replaced by `size`."
    def make(**kw):
        kw.update(size)
        return VisionTransformer(**kw)
    return make


def tiny_bert_dir(models, root: Path, seed: int, config: dict = TINY_BERT, name: str = 'tiny_bert') -> Path:
    "A folder with a tiny config.json, random `BertForMaskedLM` weights (their xbert class) and the vocabulary, for `from_pretrained`."
    d = root / name; d.mkdir(parents=True, exist_ok=True)
    (d / 'config.json').write_text(json.dumps(config, indent=1))
    (d / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n')
    torch.manual_seed(seed)
    m = models.xbert.BertForMaskedLM(models.xbert.BertConfig.from_json_file(str(d / 'config.json')))
    m.save_pretrained(str(d), safe_serialization=False)
    return d


@torch.no_grad()
def perturb_(params, scale: float, gen: torch.Generator):
    "Add N(0, scale²) noise to every float parameter (no weight left at a 0/1 init value a converter could miss)."
    for p in params: p.add_(torch.randn(p.shape, generator=gen) * scale)


def text_inputs(gen):
    ids = torch.randint(5, TINY_BERT['vocab_size'], (B, L), generator=gen)
    att = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        ids[b, 0], ids[b, n - 1] = TOKENS['cls_token_id'], TOKENS['sep_token_id']
        ids[b, n:] = TOKENS['pad_token_id']; att[b, :n] = 1
    return ids, att


class Recorder:
    "Wrap their random draws and record intermediate tensors during one forward."
    def __init__(self, model):
        self.model, self.rec, self.normalized, self.draws, self.weights = model, {}, [], [], []
        self.handles = []
        hook = lambda name: (lambda mod, inp, out: self.rec.setdefault(name, out.detach().clone()))
        self.handles.append(model.visual_encoder.register_forward_hook(hook('image_embeds')))
        self.handles.append(model.itm_head.register_forward_hook(hook('itm_logits')))
        bert = model.text_encoder.bert if hasattr(model.text_encoder, 'bert') else model.text_encoder
        def text_hook(mod, args, kwargs, out):
            if kwargs.get('mode') == 'text': self.rec.setdefault('text_embeds', out.last_hidden_state.detach().clone())
        self.handles.append(bert.register_forward_hook(text_hook, with_kwargs=True))
        if hasattr(model.text_encoder, 'cls'):
            self.handles.append(model.text_encoder.cls.register_forward_hook(hook('mlm_logits')))
            self.handles.append(model.text_encoder_m.cls.register_forward_hook(hook('mlm_logits_m')))
        if hasattr(model, 'mask'):
            orig_mask = model.mask
            def mask(*a, **k):
                ids, labels = orig_mask(*a, **k)
                self.rec['mlm_input_ids'], self.rec['mlm_labels'] = ids.clone(), labels.clone()
                return ids, labels
            model.mask = mask

    def __enter__(self):
        self._normalize, self._multinomial = torch.nn.functional.normalize, torch.multinomial
        def normalize(x, *a, **k):
            y = self._normalize(x, *a, **k); self.normalized.append(y.detach().clone()); return y
        def multinomial(w, n, *a, **k):
            j = self._multinomial(w, n, *a, **k); self.weights.append(w.detach().clone()); self.draws.append(j.clone()); return j
        torch.nn.functional.normalize, torch.multinomial = normalize, multinomial
        return self

    def __exit__(self, *exc):
        torch.nn.functional.normalize, torch.multinomial = self._normalize, self._multinomial
        for h in self.handles: h.remove()
        self.model.__dict__.pop('mask', None)

    def result(self):
        "Everything recorded; their forward normalises image, text, image_m, text_m features in that order."
        r = dict(self.rec)
        r['image_feat'], r['text_feat'], r['image_feat_m'], r['text_feat_m'] = self.normalized[:4]
        w, d = torch.stack(self.weights), torch.cat(self.draws)
        r['itm_weights_t2i'], r['itm_weights_i2t'] = w[:B], w[B:]      # rows of their (unnormalised) sampling weights
        r['neg_img_for_txt'], r['neg_txt_for_img'] = d[:B], d[B:]    # first loop: an image per text; then a text per image
        return r


@torch.no_grad()
def pair_itm_logits(model, image, ids, att):
    "ITM logits (B_img, B_txt, 2) of every (image i, text j) pair, in eval mode, the way their Retrieval.py scores pairs."
    bert = model.text_encoder.bert if hasattr(model.text_encoder, 'bert') else model.text_encoder
    img = model.visual_encoder(image)
    txt = bert(ids, attention_mask=att, return_dict=True, mode='text').last_hidden_state
    ii, jj = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
    out = bert(encoder_embeds=txt[jj], attention_mask=att[jj], encoder_hidden_states=img[ii],
               encoder_attention_mask=torch.ones(img[ii].shape[:2], dtype=torch.long), return_dict=True, mode='fusion')
    return model.itm_head(out.last_hidden_state[:, 0]).reshape(B, B, 2)


def show(what, msg):
    "Their load_state_dict message, short: the missing keys and the unexpected ones (counted, a few named)."
    f = lambda ks: f'{len(ks)}' + (f" ({', '.join(ks[:4])}{', ...' if len(ks) > 4 else ''})" if ks else '')
    print(f'{what}: missing {f(list(msg.missing_keys))}; unexpected {f(list(msg.unexpected_keys))}')


def packed(sd: dict) -> dict:
    """The same state dict (keys, dtypes, shapes, values; tied tensors stay tied) with every tensor a view into one
    flat storage per dtype, so that torch.save writes one storage per dtype instead of one per tensor (the golden files
    stay small: a tiny tensor costs a few hundred bytes of zip entry of its own)."""
    out, groups = {}, {}
    for k, v in sd.items(): groups.setdefault(v.dtype, []).append(k)
    for dtype, keys in groups.items():
        firsts, total = {}, 0
        for k in keys:
            ptr = (sd[k].data_ptr(), tuple(sd[k].shape), tuple(sd[k].stride()))
            if ptr not in firsts: firsts[ptr] = (total, k); total += sd[k].numel()
        buf = torch.empty(total, dtype=dtype)
        views = {}
        for ptr, (o, k) in firsts.items():
            n = sd[k].numel()
            buf[o:o + n] = sd[k].reshape(-1)
            views[ptr] = buf[o:o + n].view(sd[k].shape)
        for k in keys: out[k] = views[(sd[k].data_ptr(), tuple(sd[k].shape), tuple(sd[k].stride()))]
    return {k: out[k] for k in sd}


def packed_tree(obj):
    "`packed` for the golden record: every tensor of a nested dict / list becomes a view into one storage per dtype."
    flat = {}
    def walk(o, path):
        if isinstance(o, torch.Tensor): flat[path] = o
        elif isinstance(o, dict): [walk(v, path + (k,)) for k, v in o.items()]
        elif isinstance(o, (list, tuple)): [walk(v, path + (i,)) for i, v in enumerate(o)]
    walk(obj, ())
    views = packed({'/'.join(map(str, p)): t.detach().contiguous() for p, t in flat.items()})
    def build(o, path):
        if isinstance(o, torch.Tensor): return views['/'.join(map(str, path))]
        if isinstance(o, dict): return {k: build(v, path + (k,)) for k, v in o.items()}
        if isinstance(o, (list, tuple)): return type(o)(build(v, path + (i,)) for i, v in enumerate(o))
        return o
    return build(obj, ())


MOMENTUM = dict(vqa=('visual_encoder', 'text_encoder', 'text_decoder'), nlvr=('visual_encoder', 'text_encoder', 'cls_head'),
                ve=('visual_encoder', 'text_encoder', 'cls_head'))


def students(sd: dict, task: str) -> dict:
    """The state dict without the momentum copies (kept out of the golden files to keep them small). Their momentum
    models are the `<part>_m` copies of the MOMENTUM parts, key for key: checked here, recorded in the meta."""
    st = {k: v for k, v in sd.items() if not k.split('.')[0].endswith('_m')}
    teacher = {k for k in sd if k not in st}
    expect = {p + '_m' + k[len(p):] for k in st for p in MOMENTUM[task] if k.startswith(p + '.')}
    assert teacher == expect, (task, sorted(teacher ^ expect)[:5])
    assert all(sd[p + '_m' + k[len(p):]].shape == sd[k].shape for k in st for p in MOMENTUM[task] if k.startswith(p + '.'))
    return st


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_pretrain(models, bert_dir: Path, gen: torch.Generator):
    mp = models.model_pretrain
    mp.VisionTransformer = tiny_vit(models.vit.VisionTransformer)
    cfg = dict(PRETRAIN, bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(1)
    model = mp.ALBEF(text_encoder=str(bert_dir), tokenizer=SimpleNamespace(**TOKENS), config=cfg, init_deit=False)
    students = [p for a, _ in model.model_pairs for p in a.parameters()] + list(model.itm_head.parameters())
    perturb_(students, 0.05, gen)
    with torch.no_grad(): model.temp.fill_(0.08)                       # not the default, so a lost `temp` shows
    model.copy_params()
    perturb_([p for _, b in model.model_pairs for p in b.parameters()], 0.02, gen)
    sd = state(model)                                                  # the checkpoint: before the step
    image = torch.randn(B, 3, cfg['image_res'], cfg['image_res'], generator=gen)
    ids, att = text_inputs(gen)
    model.train()
    torch.manual_seed(2)
    with Recorder(model) as r:
        loss_mlm, loss_ita, loss_itm = model(image, SimpleNamespace(input_ids=ids, attention_mask=att), alpha=cfg['alpha'])
    out = r.result()
    out.update(loss_itc=loss_ita.detach(), loss_itm=loss_itm.detach(), loss_mlm=loss_mlm.detach())
    after = state(model)
    out['after'] = {k: after[k] for k in ('image_queue', 'text_queue', 'queue_ptr', 'vision_proj_m.weight', 'text_proj_m.weight',
                                          'visual_encoder_m.pos_embed', 'text_encoder_m.cls.predictions.transform.dense.weight',
                                          'text_encoder_m.bert.encoder.layer.3.crossattention.self.key.weight')}
    model.eval()
    out['pair_itm_logits'] = pair_itm_logits(model, image, ids, att)
    out['inputs'] = dict(image=image, input_ids=ids, attention_mask=att)
    return sd, out


def run_retrieval(models, bert_dir: Path, pretrain_sd: dict, gen: torch.Generator):
    mr = models.model_retrieval
    mr.VisionTransformer = tiny_vit(models.vit.VisionTransformer)
    cfg = dict(RETRIEVAL, bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(3)
    model = mr.ALBEF(text_encoder=str(bert_dir), tokenizer=SimpleNamespace(**TOKENS), config=cfg)
    # load the pre-training checkpoint exactly as their Retrieval.py does
    sd = {k: v.clone() for k, v in pretrain_sd.items()}
    for k in ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed'):
        sd[k] = models.vit.interpolate_pos_embed(sd[k], getattr(model, k.split('.')[0]))
    for key in list(sd):
        if 'bert' in key:
            sd[key.replace('bert.', '')] = sd.pop(key)
    msg = model.load_state_dict(sd, strict=False)
    show('retrieval <- pretrain', msg)
    with torch.no_grad():     # a fine-tuned checkpoint's queue holds image ids and a moved pointer
        model.idx_queue.copy_(torch.tensor([[0, 5, 1, 7, 2, 9, 0, 11, 3, 4, 6, 8, 10, 12, 2, 1]]))
        model.queue_ptr.fill_(8)
    rsd = state(model)
    image = torch.randn(B, 3, cfg['image_res'], cfg['image_res'], generator=gen)
    ids, att = text_inputs(gen)
    idx = torch.tensor([0, 1, 0, 2])
    model.train()
    torch.manual_seed(4)
    with Recorder(model) as r:
        loss_ita, loss_itm = model(image, SimpleNamespace(input_ids=ids, attention_mask=att), alpha=cfg['alpha'], idx=idx)
    out = r.result()
    out.update(loss_itc=loss_ita.detach(), loss_itm=loss_itm.detach())
    after = state(model)
    out['after'] = {k: after[k] for k in ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr', 'vision_proj_m.weight',
                                          'text_encoder_m.encoder.layer.3.crossattention.self.key.weight')}
    model.eval()
    out['pair_itm_logits'] = pair_itm_logits(model, image, ids, att)
    out['inputs'] = dict(image=image, input_ids=ids, attention_mask=att, idx=idx)
    return rsd, out


# ---- fine-tuning tasks ---------------------------------------------------------------------------------------------
def tokenize(tok, texts):
    "Their tokenizer as their task scripts call it (padding='longest'); returns (input_ids, attention_mask)."
    t = tok(texts, padding='longest', return_tensors='pt')
    return t.input_ids, t.attention_mask


def run_task_pretrain(models, bert_dir: Path, gen: torch.Generator):
    "Their pre-training ALBEF at the task size (12-layer BERT, fusion_layer 6): the checkpoint every task starts from."
    mp = models.model_pretrain
    mp.VisionTransformer = tiny_vit(models.vit.VisionTransformer, TASK_VIT)
    cfg = dict(TASK_PRETRAIN, bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(11)
    model = mp.ALBEF(text_encoder=str(bert_dir), tokenizer=SimpleNamespace(**TOKENS), config=cfg, init_deit=False)
    perturb_([p for a, _ in model.model_pairs for p in a.parameters()] + list(model.itm_head.parameters()), 0.05, gen)
    model.copy_params()
    perturb_([p for _, b in model.model_pairs for p in b.parameters()], 0.02, gen)
    return state(model)


def interpolated(models, sd: dict, model, keys=('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed')) -> dict:
    "Their `interpolate_pos_embed` on the given ViTs' position embeddings (their task scripts do it before loading)."
    sd = dict(sd)
    for k in keys:
        if k in sd: sd[k] = models.vit.interpolate_pos_embed(sd[k], getattr(model, k.split('.')[0]))
    return sd


def vqa_start(pre: dict) -> dict:
    """The state dict their VQA.py loads from a pre-training checkpoint (written out from its loop): every text-encoder
    key loses `bert.` for the encoder (a BertModel), and the decoder (and its momentum twin) gets the embeddings, the
    MLM head and encoder layers 6..11 as its layers 0..5."""
    out = {}
    for k, v in pre.items():
        head, _, rest = k.partition('.')
        if head not in ('text_encoder', 'text_encoder_m'): out[k] = v; continue
        if rest.startswith('bert.'): out[f'{head}.{rest[5:]}'] = v
        dec = head.replace('text_encoder', 'text_decoder')
        parts = rest.split('.')
        if parts[:3] != ['bert', 'encoder', 'layer']: out[f'{dec}.{rest}'] = v
        elif int(parts[3]) >= 6: out[f'{dec}.' + '.'.join(parts[:3] + [str(int(parts[3]) - 6)] + parts[4:])] = v
    return out


def nlvr_ta_start(pre: dict) -> dict:
    """The state dict their Pretrain_nlvr.py loads from a pre-training checkpoint: `bert.` dropped, text layers 0..5 as
    they are, fusion layer L (6..11) copied to layers 6+2(L-6) and 7+2(L-6); every other key unchanged."""
    out = {}
    for k, v in pre.items():
        if 'bert.' not in k: out[k] = v; continue
        k = k.replace('bert.', '')
        parts = k.split('.')
        if len(parts) > 3 and parts[1:3] == ['encoder', 'layer'] and int(parts[3]) >= 6:
            for j in (6 + 2 * (int(parts[3]) - 6), 7 + 2 * (int(parts[3]) - 6)):
                out['.'.join(parts[:3] + [str(j)] + parts[4:])] = v
        else: out[k] = v
    return out


def strip_bert(pre: dict) -> dict:
    "Their VE.py / NLVR.py / Retrieval.py rename: `bert.` removed from every key."
    return {k.replace('bert.', ''): v for k, v in pre.items()}


class Softmaxes:
    "Record the inputs of the 2-D `F.softmax` calls (rank_answer's first-token logits and its re-ranking log-probs)."
    def __enter__(self):
        self.inputs, self._f = [], torch.nn.functional.softmax
        def softmax(x, *a, **k):
            if x.dim() == 2: self.inputs.append(x.detach().clone())
            return self._f(x, *a, **k)
        torch.nn.functional.softmax = softmax
        return self

    def __exit__(self, *exc): torch.nn.functional.softmax = self._f


class Capture:
    "Record the `last_hidden_state` of a module's forward (their text encoder)."
    def __init__(self, module): self.h, self.out = module.register_forward_hook(self._hook), []
    def _hook(self, mod, inp, out): self.out.append(out.last_hidden_state.detach().clone())
    def __enter__(self): return self
    def __exit__(self, *exc): self.h.remove()


@torch.no_grad()
def vqa_rank(model, image, q, a, k):
    model.eval()
    with Softmaxes() as sm, Capture(model.text_encoder) as cap:
        ids, probs = model(image, q, a, train=False, k=k)
    return dict(topk_ids=ids, topk_probs=probs, start_logits=sm.inputs[0], rank_log_probs=sm.inputs[-1],
                question_states=cap.out[0])


def run_vqa(models, bert_dir: Path, pre: dict, tok, gen: torch.Generator):
    mv = models.model_vqa
    mv.VisionTransformer = tiny_vit(models.vit.VisionTransformer, TASK_VIT)
    cfg = dict(image_res=TASK['image_res'], distill=TASK['distill'], bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(12)
    model = mv.ALBEF(text_encoder=str(bert_dir), text_decoder=str(bert_dir), tokenizer=tok, config=cfg)
    msg = model.load_state_dict(vqa_start(interpolated(models, pre, model)), strict=False)
    show('vqa <- pretrain', msg)
    image = torch.randn(len(QUESTIONS), 3, cfg['image_res'], cfg['image_res'], generator=gen)
    q_ids, q_att = tokenize(tok, QUESTIONS)
    a_ids, a_att = tokenize(tok, [x + TASK['eos'] for x in ANSWERS])     # their evaluation(): answer + eos
    q, a = SimpleNamespace(input_ids=q_ids, attention_mask=q_att), SimpleNamespace(input_ids=a_ids, attention_mask=a_att)
    out = dict(inputs=dict(image=image, question_ids=q_ids, question_mask=q_att, answer_ids=a_ids, answer_mask=a_att))
    out['init'] = vqa_rank(model, image, q, a, K_TEST)                       # as VQA.py starts fine-tuning
    perturb_(model.parameters(), FINETUNE_NOISE, gen)                        # "fine-tuned": decoder != fusion layers
    sd = state(model)
    out['rank'] = vqa_rank(model, image, q, a, K_TEST)
    out['rank_all'] = vqa_rank(model, image, q, a, len(ANSWERS))
    # one training forward (their train(): answers + eos, weights, k answers per question); alpha 0: the loss is the
    # student's alone (their distilled term is weighted by alpha), as the momentum copies are not saved
    t_ids, t_att = tokenize(tok, [x + TASK['eos'] for xs in TRAIN_ANSWERS for x in xs])
    weights = torch.tensor([w for ws in TRAIN_WEIGHTS for w in ws])
    n = [len(xs) for xs in TRAIN_ANSWERS]
    model.train()
    loss = model(image, q, SimpleNamespace(input_ids=t_ids, attention_mask=t_att), alpha=0.0, k=n, weights=weights, train=True)
    out['train'] = dict(answer_ids=t_ids, answer_mask=t_att, weights=weights, n_answers=torch.tensor(n), loss=loss.detach())
    return students(sd, 'vqa'), out


def pair_inputs(tok, gen, n_images=None):
    image0 = torch.randn(len(PAIR_TEXTS), 3, TASK['image_res'], TASK['image_res'], generator=gen)
    image1 = torch.randn(len(PAIR_TEXTS), 3, TASK['image_res'], TASK['image_res'], generator=gen)
    ids, att = tokenize(tok, PAIR_TEXTS)
    return image0, image1, ids, att


@torch.no_grad()
def classify(model, images, ids, att, targets):
    "Their eval-mode forward: (logits, fused [CLS] states)."
    model.eval()
    with Capture(model.text_encoder) as cap:
        logits = model(images, SimpleNamespace(input_ids=ids, attention_mask=att), targets, train=False)
    return dict(logits=logits, cls=cap.out[0][:, 0])


def train_loss(model, images, ids, att, targets):
    "Their training forward with alpha 0 (the student's CE; the momentum copies are not saved)."
    model.train()
    return dict(loss=model(images, SimpleNamespace(input_ids=ids, attention_mask=att), targets, alpha=0.0, train=True).detach())


def run_nlvr(models, bert_dir: Path, pre: dict, tok, gen: torch.Generator):
    """Their NLVR2 pipeline: the pre-training checkpoint into the text-assignment model (Pretrain_nlvr.py), whose
    weights (here perturbed instead of TA-trained) start model_nlvr.py (NLVR.py: position embedding interpolated, the
    momentum copies made *before* the checkpoint is loaded), then perturbed again as a fine-tuned NLVR2 model."""
    mt, mn = models.model_pretrain_nlvr, models.model_nlvr
    mt.VisionTransformer = mn.VisionTransformer = tiny_vit(models.vit.VisionTransformer, TASK_VIT)
    cfg_ta = dict(image_res=TASK_PRETRAIN['image_res'], vision_width=TASK_PRETRAIN['vision_width'], embed_dim=TASK_PRETRAIN['embed_dim'],
                  bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(13)
    ta = mt.ALBEF(text_encoder=str(bert_dir), tokenizer=tok, config=cfg_ta)
    msg = ta.load_state_dict(interpolated(models, nlvr_ta_start(pre), ta, ('visual_encoder.pos_embed',)), strict=False)
    show('nlvr TA <- pretrain', msg)
    perturb_(ta.parameters(), 0.03, gen)                                        # stands for the TA epoch: pairs now differ
    ta_sd = state(ta)
    image0, image1, ids, att = pair_inputs(tok, gen)
    out = dict(inputs=dict(image0=image0, image1=image1, input_ids=ids, attention_mask=att, targets=torch.tensor(NLVR_TARGETS)))
    ta_images = torch.randn(len(PAIR_TEXTS), 3, TASK_PRETRAIN['image_res'], TASK_PRETRAIN['image_res'], generator=gen)
    with torch.no_grad():                                                       # TA logits of fixed (slot 0, slot 1) pairs
        ta.eval()
        emb = ta.visual_encoder(ta_images)
        i0, i1 = torch.tensor(TA_PAIRS[0]), torch.tensor(TA_PAIRS[1])
        h = ta.text_encoder(ids, attention_mask=att, encoder_hidden_states=[emb[i0], emb[i1]],
                            encoder_attention_mask=[torch.ones(emb[i0].shape[:2], dtype=torch.long)] * 2, return_dict=True).last_hidden_state
        out['ta'] = dict(image=ta_images, pairs=torch.tensor(TA_PAIRS), logits=ta.ta_head(h[:, 0]),
                         image_feat=torch.nn.functional.normalize(ta.vision_proj(emb[:, 0]), dim=-1))
    cfg = dict(image_res=TASK['image_res'], distill=TASK['distill'], bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(14)
    model = mn.ALBEF(text_encoder=str(bert_dir), tokenizer=tok, config=cfg)
    model.copy_params()                                                         # NLVR.py: before loading
    msg = model.load_state_dict(interpolated(models, ta_sd, model, ('visual_encoder.pos_embed',)), strict=False)
    show('nlvr <- TA', msg)
    images, targets = torch.cat([image0, image1]), torch.tensor(NLVR_TARGETS)
    out['init'] = classify(model, images, ids, att, targets)
    perturb_(model.parameters(), FINETUNE_NOISE, gen)
    sd = state(model)
    out['finetuned'] = classify(model, images, ids, att, targets)
    out['train'] = train_loss(model, images, ids, att, targets)
    return ta_sd, students(sd, 'nlvr'), out


def run_ve(models, bert_dir: Path, pre: dict, tok, gen: torch.Generator):
    "Their SNLI-VE model: the pre-training checkpoint loaded as VE.py does (both position embeddings, `bert.` dropped)."
    me = models.model_ve
    me.VisionTransformer = tiny_vit(models.vit.VisionTransformer, TASK_VIT)
    cfg = dict(image_res=TASK['image_res'], distill=TASK['distill'], bert_config=str(bert_dir / 'config.json'))
    torch.manual_seed(15)
    model = me.ALBEF(text_encoder=str(bert_dir), tokenizer=tok, config=cfg)
    msg = model.load_state_dict(strip_bert(interpolated(models, pre, model)), strict=False)
    show('ve <- pretrain', msg)
    image = torch.randn(len(PAIR_TEXTS), 3, TASK['image_res'], TASK['image_res'], generator=gen)
    ids, att = tokenize(tok, PAIR_TEXTS)
    targets = torch.tensor(VE_TARGETS)
    out = dict(inputs=dict(image=image, input_ids=ids, attention_mask=att, targets=targets))
    out['init'] = classify(model, image, ids, att, targets)
    perturb_(model.parameters(), FINETUNE_NOISE, gen)
    sd = state(model)
    out['finetuned'] = classify(model, image, ids, att, targets)
    out['train'] = train_loss(model, image, ids, att, targets)
    return students(sd, 've'), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--albef', default=os.environ.get('ALBEF_SRC'), help='folder holding the official `models/` package')
    ap.add_argument('--out', default=str(Path(__file__).parent))
    ap.add_argument('--commit', default=os.environ.get('ALBEF_COMMIT', 'unknown'), help='commit of the official code')
    a = ap.parse_args(argv)
    if not a.albef: ap.error('give --albef PATH (or set ALBEF_SRC)')
    src, out = Path(a.albef).resolve(), Path(a.out)
    if a.commit == 'unknown':
        r = subprocess.run(['git', '-C', str(src), 'rev-parse', 'HEAD'], capture_output=True, text=True)
        if r.returncode == 0: a.commit = r.stdout.strip()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    models = import_official(src)
    gen = torch.Generator().manual_seed(1234)
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = tiny_bert_dir(models, Path(tmp), seed=0)
        psd, pout = run_pretrain(models, bert_dir, gen)
        rsd, rout = run_retrieval(models, bert_dir, psd, gen)
        task_dir = tiny_bert_dir(models, Path(tmp), seed=10, config=TASK_BERT, name='task_bert')
        tok = models.tokenization_bert.BertTokenizer.from_pretrained(str(task_dir))   # as their scripts: [CLS] text, no [SEP]
        tpsd = run_task_pretrain(models, task_dir, gen)     # saved without momentum copies and queues (not needed)
        vqa_sd, vqa_out = run_vqa(models, task_dir, tpsd, tok, gen)
        ta_sd, nlvr_sd, nlvr_out = run_nlvr(models, task_dir, tpsd, tok, gen)
        ve_sd, ve_out = run_ve(models, task_dir, tpsd, tok, gen)
    import transformers, timm
    meta = dict(albef_commit=a.commit, torch=torch.__version__, transformers=transformers.__version__,
                timm=timm.__version__, tiny_vit=TINY_VIT, tiny_bert=TINY_BERT, tokens=TOKENS, pretrain=PRETRAIN,
                retrieval=RETRIEVAL, batch=B, length=L, lengths=LENGTHS, vocab=VOCAB, task_vit=TASK_VIT, task_bert=TASK_BERT,
                task_pretrain=TASK_PRETRAIN, task=TASK, questions=QUESTIONS, answers=ANSWERS, train_answers=TRAIN_ANSWERS,
                train_weights=TRAIN_WEIGHTS, k_test=K_TEST, pair_texts=PAIR_TEXTS, nlvr_targets=NLVR_TARGETS,
                ve_targets=VE_TARGETS, ta_pairs=TA_PAIRS, momentum={k: list(v) for k, v in MOMENTUM.items()})
    out.mkdir(parents=True, exist_ok=True)
    torch.save({'model': packed(psd)}, out / 'albef_pretrain_tiny.pth')
    torch.save({'model': packed(rsd)}, out / 'albef_retrieval_tiny.pth')
    files = dict(albef_task_pretrain_tiny={k: v for k, v in tpsd.items() if not k.split('.')[0].endswith('_m') and 'queue' not in k}, albef_vqa_tiny=vqa_sd, albef_nlvr_ta_tiny=ta_sd, albef_nlvr_tiny=nlvr_sd,
                 albef_ve_tiny=ve_sd)
    for name, sd in files.items(): torch.save({'model': packed(sd)}, out / f'{name}.pth')
    torch.save(dict(meta=json.dumps(meta), pretrain=pout, retrieval=rout, **packed_tree(dict(vqa=vqa_out, nlvr=nlvr_out, ve=ve_out))),
               out / 'albef_golden.pt')
    total = 0
    for f in ['albef_pretrain_tiny.pth', 'albef_retrieval_tiny.pth'] + [f'{n}.pth' for n in files] + ['albef_golden.pt']:
        total += (out / f).stat().st_size
        print(f'{f}: {(out / f).stat().st_size / 1024:.1f} KiB')
    print(f'total: {total / 1024:.1f} KiB')
    print('vqa: top-%d ids %s, probs %s; train loss %.6f' % (K_TEST, vqa_out['rank']['topk_ids'].tolist(),
          [[round(p, 4) for p in r] for r in vqa_out['rank']['topk_probs'].tolist()], vqa_out['train']['loss']))
    print('nlvr logits', nlvr_out['finetuned']['logits'].tolist(), 'loss %.6f' % nlvr_out['train']['loss'])
    print('ve logits', ve_out['finetuned']['logits'].tolist(), 'loss %.6f' % ve_out['train']['loss'])
    print('pretrain losses: itc %.6f itm %.6f mlm %.6f' % (pout['loss_itc'], pout['loss_itm'], pout['loss_mlm']))
    print('retrieval losses: itc %.6f itm %.6f' % (rout['loss_itc'], rout['loss_itm']))
    print(json.dumps(meta))


if __name__ == '__main__':
    main()
