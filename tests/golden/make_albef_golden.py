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
4. saves `albef_pretrain_tiny.pth` and `albef_retrieval_tiny.pth` (`{'model': state_dict}`, as the released
   checkpoints) and `albef_golden.pt` (inputs, draws, outputs, sizes).

Adding a task later (VQA answer ranking, NLVR2 logits, ...) is one more `run_<task>` function below that builds
their model the same way (`tiny_vit` / `tiny_bert_dir`), loads the pre-training state dict as their task script
does, records inputs and outputs into `golden['<task>']`, and saves `albef_<task>_tiny.pth`.
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


def import_official(src: Path):
    "Import their `models` package from `src`, after the two adjustments ENVIRONMENT.md describes."
    import transformers.file_utils as fu
    fu.add_code_sample_docstrings = lambda *a, **k: (lambda f: f)   # their decorator call fails on transformers 4.30
    sys.path.insert(0, str(src))
    import models.vit, models.xbert, models.model_pretrain, models.model_retrieval  # noqa: E401
    import torch.distributed as dist
    if not dist.is_initialized():                                   # their queues all-gather the momentum features
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1'); os.environ.setdefault('MASTER_PORT', '29533')
        dist.init_process_group('gloo', rank=0, world_size=1)
    return models


def tiny_vit(VisionTransformer):
    "Their ViT constructor with the size arguments (hard-coded to ViT-B/16 in their models) replaced by TINY_VIT."
    def make(**kw):
        kw.update(TINY_VIT)
        return VisionTransformer(**kw)
    return make


def tiny_bert_dir(models, root: Path, seed: int) -> Path:
    "A folder with the tiny config.json and random `BertForMaskedLM` weights (their xbert class), for `from_pretrained`."
    d = root / 'tiny_bert'; d.mkdir(parents=True, exist_ok=True)
    (d / 'config.json').write_text(json.dumps(TINY_BERT, indent=1))
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
    print('retrieval <- pretrain:', msg)
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
    import transformers, timm
    meta = dict(albef_commit=a.commit, torch=torch.__version__, transformers=transformers.__version__,
                timm=timm.__version__, tiny_vit=TINY_VIT, tiny_bert=TINY_BERT, tokens=TOKENS, pretrain=PRETRAIN,
                retrieval=RETRIEVAL, batch=B, length=L, lengths=LENGTHS)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({'model': psd}, out / 'albef_pretrain_tiny.pth')
    torch.save({'model': rsd}, out / 'albef_retrieval_tiny.pth')
    torch.save(dict(meta=json.dumps(meta), pretrain=pout, retrieval=rout), out / 'albef_golden.pt')
    for f in ('albef_pretrain_tiny.pth', 'albef_retrieval_tiny.pth', 'albef_golden.pt'):
        print(f'{f}: {(out / f).stat().st_size / 1024:.1f} KiB')
    print('pretrain losses: itc %.6f itm %.6f mlm %.6f' % (pout['loss_itc'], pout['loss_itm'], pout['loss_mlm']))
    print('retrieval losses: itc %.6f itm %.6f' % (rout['loss_itc'], rout['loss_itm']))
    print(json.dumps(meta))


if __name__ == '__main__':
    main()
