"""Parity of vlnb's ALBEF and its fine-tuning tasks with the official code (github.com/salesforce/ALBEF), and checkpoint round trips.

The golden files in tests/golden/ were written by tests/golden/make_albef_golden.py running the official code
(tests/golden/README.md says how). These tests need only those files: no official code, no second virtualenv.
Official checkpoints are loaded through `vlnb.convert`; the random draws of the official forward (ITM hard
negatives, MLM masks) were recorded there and are replayed here, so that both sides see the same negatives/masks.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

import vlnb.methods.albef as albef_mod
import vlnb.tasks.retrieval as retrieval_mod
from vlnb.convert import (load_pretrained, export_official, save_official, read_checkpoint, detect_format, to_vlnb_keys,
                          albef_config_from_checkpoint, build_from_checkpoint, CheckpointError)
from vlnb.losses import HardNegatives, sample_hard_negatives
from vlnb.methods.albef import ALBEFConfig, albef_config, build_albef
from vlnb.tasks.retrieval import RetrievalModel

torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / 'golden'
PRETRAIN, RETRIEVAL = GOLDEN / 'albef_pretrain_tiny.pth', GOLDEN / 'albef_retrieval_tiny.pth'
TASK_PRETRAIN, VQA, NLVR, NLVR_TA, VE = (GOLDEN / f'albef_{n}_tiny.pth' for n in ('task_pretrain', 'vqa', 'nlvr', 'nlvr_ta', 've'))
TOL = 1e-5
B = 4

# The tiny configuration of make_albef_golden.py, written out for vlnb (checked against the golden meta below).
VISION = dict(name='vit_base_patch16_224', patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
TEXT = dict(preset='tiny', vocab_size=50, hidden_size=12, num_hidden_layers=4, num_attention_heads=2, intermediate_size=24,
            fusion_layer=2, encoder_width=16, max_position_embeddings=12, type_vocab_size=2, hidden_act='gelu',
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0)
ALPHA = 0.4


# vlnb-only schedule switches, pinned to the official behaviour (no ramp, no ITC-only bootstrap) where they exist
SCHEDULE = {k: 0 for k in ('alpha_warmup_steps', 'itc_warmup_steps') if k in ALBEFConfig.__dataclass_fields__}


def tiny_albef(img_size: int, seed: int = 0, distill: bool = True):
    torch.manual_seed(seed)
    cfg = albef_config('tiny', vision=dict(VISION, img_size=img_size), text=dict(TEXT), embed_dim=8, queue_size=16,
                       momentum=0.995, temp=0.07, alpha=ALPHA, distill=distill, mlm_probability=0.15, **SCHEDULE)
    return build_albef(cfg)


@pytest.fixture(scope='module')
def golden():
    g = torch.load(GOLDEN / 'albef_golden.pt', weights_only=True)
    g['meta'] = json.loads(g['meta'])
    return g


def close(a, b, what, tol=TOL):
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, f'{what}: shape {tuple(a.shape)} vs official {tuple(b.shape)}'
    d = (a - b).abs().max().item()
    assert d <= tol, f'{what}: max |vlnb - official| = {d:.3g} > {tol}'
    return d


def test_config_matches_generator(golden):
    m = golden['meta']
    assert m['albef_commit'].startswith('b9727e43')
    assert {k: m['tiny_vit'][k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')} == \
           {k: VISION[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')}
    for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'fusion_layer',
              'encoder_width', 'max_position_embeddings', 'type_vocab_size', 'hidden_dropout_prob',
              'attention_probs_dropout_prob', 'layer_norm_eps', 'hidden_act', 'pad_token_id'):
        assert m['tiny_bert'][k] == TEXT[k], k
    assert m['pretrain']['image_res'] == 16 and m['retrieval']['image_res'] == 24
    assert m['pretrain']['alpha'] == m['retrieval']['alpha'] == ALPHA


def test_detect_formats():
    assert detect_format(read_checkpoint(PRETRAIN))[0].name == 'albef_pretrain'
    assert detect_format(read_checkpoint(RETRIEVAL))[0].name == 'albef_retrieval'
    assert detect_format(tiny_albef(16).state_dict())[0].name == 'vlnb'
    assert detect_format(RetrievalModel(tiny_albef(16)).state_dict()) [1] == 'encoders.'


def _replay(monkeypatch, module, g, ids=None):
    "Make vlnb's forward use the official forward's hard negatives (and MLM masks); record what it was given."
    seen = {}
    def negatives(sim_i2t, sim_t2i, idx=None, generator=None, hardest=False):
        seen.update(sim_i2t=sim_i2t.detach().clone(), sim_t2i=sim_t2i.detach().clone(), idx=idx)
        return HardNegatives(g['neg_img_for_txt'].clone(), g['neg_txt_for_img'].clone())
    monkeypatch.setattr(module, 'sample_hard_negatives', negatives)
    if ids is not None:
        def mask(input_ids, *a, **k):
            assert torch.equal(input_ids, ids), 'MLM masking was given other ids than the batch'
            seen['masked'] = True
            return g['mlm_input_ids'].clone(), g['mlm_labels'].clone()
        monkeypatch.setattr(module, 'mask_tokens', mask)
    return seen


def _hooks(model):
    rec = {}
    hs = [model.itm_head.register_forward_hook(lambda m, i, o: rec.setdefault('itm', o.detach().clone()))]
    if hasattr(model.text_encoder, 'cls'):
        hs.append(model.text_encoder.cls.register_forward_hook(lambda m, i, o: rec.setdefault('mlm', o.detach().clone())))
        hs.append(model.text_encoder_m.cls.register_forward_hook(lambda m, i, o: rec.setdefault('mlm_m', o.detach().clone())))
    return rec, hs


def _check_sampling_weights(seen, g, monkeypatch, idx=None):
    """vlnb samples ITM negatives with the official probabilities: from the similarities its forward produced, the
    distributions `sample_hard_negatives` hands to `torch.multinomial` equal the official (normalised) weights, and
    the hardest negatives are their arg-max."""
    ref_t2i = g['itm_weights_t2i'] / g['itm_weights_t2i'].sum(1, keepdim=True)
    ref_i2t = g['itm_weights_i2t'] / g['itm_weights_i2t'].sum(1, keepdim=True)
    probs, multinomial = [], torch.multinomial
    def spy(p, n, *a, **k):
        probs.append(p.detach().clone()); return multinomial(p, n, *a, **k)
    monkeypatch.setattr(torch, 'multinomial', spy)
    d = sample_hard_negatives(seen['sim_i2t'], seen['sim_t2i'], idx=idx, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, 'multinomial', multinomial)
    assert len(probs) == 2                           # one batched draw per side: negative images, then negative texts
    close(probs[0] / probs[0].sum(1, keepdim=True), ref_t2i, 'ITM negative-image sampling probabilities')
    close(probs[1] / probs[1].sum(1, keepdim=True), ref_i2t, 'ITM negative-text sampling probabilities')
    assert (ref_t2i[torch.arange(B), d.img_for_txt] > 0).all() and (ref_i2t[torch.arange(B), d.txt_for_img] > 0).all()
    hard = sample_hard_negatives(seen['sim_i2t'], seen['sim_t2i'], idx=idx, hardest=True)
    assert torch.equal(hard.img_for_txt, ref_t2i.argmax(1)) and torch.equal(hard.txt_for_img, ref_i2t.argmax(1))


def test_pretrain_parity(golden, monkeypatch):
    g, x = golden['pretrain'], golden['pretrain']['inputs']
    model = tiny_albef(16)
    rep = load_pretrained(model, PRETRAIN)
    assert rep.ok and rep.format == 'albef_pretrain' and rep.left_at_init == ['queue.idx_queue', 'step']
    seen = _replay(monkeypatch, albef_mod, g, ids=x['input_ids'])
    rec, hooks = _hooks(model)
    model.train()
    out = model(dict(image=x['image'], input_ids=x['input_ids'], attention_mask=x['attention_mask']), alpha=ALPHA)
    for h in hooks: h.remove()
    assert seen.get('masked')
    d = {}
    d['loss_itc'] = close(out.loss_itc, g['loss_itc'], 'ITC loss')
    d['loss_itm'] = close(out.loss_itm, g['loss_itm'], 'ITM loss')
    d['loss_mlm'] = close(out.loss_mlm, g['loss_mlm'], 'MLM loss')
    d['itm_logits'] = close(rec['itm'], g['itm_logits'], 'ITM logits (3B pairs)')
    d['mlm_logits'] = close(rec['mlm'], g['mlm_logits'], 'MLM logits')
    d['mlm_logits_m'] = close(rec['mlm_m'], g['mlm_logits_m'], 'teacher MLM logits')
    _check_sampling_weights(seen, g, monkeypatch)
    after, _, _ = to_vlnb_keys(g['after'], 'albef_pretrain')      # queues after enqueue, momentum weights after the EMA
    sd = model.state_dict()
    for k, v in after.items(): d[k] = close(sd[k], v, f'{k} after the step')
    model.eval()
    with torch.no_grad():
        img, img_f = model.encode_image(x['image'])
        txt, txt_f = model.encode_text(x['input_ids'], x['attention_mask'])
        _, img_fm = model.encode_image(x['image'], momentum=True)
        _, txt_fm = model.encode_text(x['input_ids'], x['attention_mask'], momentum=True)
        ii, jj = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
        pairs = model.itm_logits(txt[jj], x['attention_mask'][jj], img[ii]).reshape(B, B, 2)
    d['image_embeds'] = close(img, g['image_embeds'], 'ViT tokens')
    d['text_embeds'] = close(txt, g['text_embeds'], 'text-layer states')
    for k, v in (('image_feat', img_f), ('text_feat', txt_f), ('image_feat_m', img_fm), ('text_feat_m', txt_fm)):
        d[k] = close(v, g[k], k)
    d['pair_itm_logits'] = close(pairs, g['pair_itm_logits'], 'ITM logits of all (image, text) pairs')
    print('pretrain max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def test_retrieval_parity(golden, monkeypatch):
    g, x = golden['retrieval'], golden['retrieval']['inputs']
    model = RetrievalModel(tiny_albef(24), alpha=ALPHA)
    rep = load_pretrained(model, RETRIEVAL)
    assert rep.ok and rep.format == 'albef_retrieval' and rep.root == 'encoders.'
    assert {k for k in rep.left_at_init if '.cls.' in k} and all('.cls.' in k or k == 'encoders.step' for k in rep.left_at_init)
    seen = _replay(monkeypatch, retrieval_mod, g)
    enc = model.encoders
    rec, hooks = _hooks(enc)
    model.train()
    out = model(dict(image=x['image'], input_ids=x['input_ids'], attention_mask=x['attention_mask'], idx=x['idx']))
    for h in hooks: h.remove()
    d = {}
    d['loss_itc'] = close(out.loss_itc, g['loss_itc'], 'ITC loss (positives by image id, idx queue)')
    d['loss_itm'] = close(out.loss_itm, g['loss_itm'], 'ITM loss')
    d['itm_logits'] = close(rec['itm'], g['itm_logits'], 'ITM logits (3B pairs)')
    _check_sampling_weights(seen, g, monkeypatch, idx=x['idx'])
    after, _, _ = to_vlnb_keys(g['after'], 'albef_retrieval')
    sd = enc.state_dict()
    for k, v in after.items():
        assert sd[k].dtype == v.dtype, k
        d[k] = close(sd[k], v, f'{k} after the step')
    model.eval()
    with torch.no_grad():
        img, img_f = enc.encode_image(x['image'])
        txt, txt_f = enc.encode_text(x['input_ids'], x['attention_mask'])
        _, img_fm = enc.encode_image(x['image'], momentum=True)
        _, txt_fm = enc.encode_text(x['input_ids'], x['attention_mask'], momentum=True)
        ii, jj = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
        pairs = enc.itm_logits(txt[jj], x['attention_mask'][jj], img[ii]).reshape(B, B, 2)
    d['image_embeds'] = close(img, g['image_embeds'], 'ViT tokens (24 px, resized pos_embed)')
    d['text_embeds'] = close(txt, g['text_embeds'], 'text-layer states')
    for k, v in (('image_feat', img_f), ('text_feat', txt_f), ('image_feat_m', img_fm), ('text_feat_m', txt_fm)):
        d[k] = close(v, g[k], k)
    d['pair_itm_logits'] = close(pairs, g['pair_itm_logits'], 'ITM logits of all (image, text) pairs')
    print('retrieval max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def test_pretrain_into_retrieval_matches_official_loading():
    "Fine-tuning starts like the official Retrieval.py: both position embeddings resized 4x4 -> 6x6, `bert.` stripped."
    model = RetrievalModel(tiny_albef(24))
    rep = load_pretrained(model, PRETRAIN)
    assert rep.ok and sorted(rep.resized) == ['encoders.visual_encoder.pos_embed', 'encoders.visual_encoder_m.pos_embed']
    assert rep.resized['encoders.visual_encoder.pos_embed'] == ((1, 17, 16), (1, 37, 16))
    official, _, _ = to_vlnb_keys(read_checkpoint(RETRIEVAL), 'albef_retrieval')
    sd = model.encoders.state_dict()
    for k in ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed'): close(sd[k], official[k], k, tol=1e-6)
    for k, v in official.items():     # everything else is the same tensor (the generator then set idx_queue, queue_ptr)
        if k not in ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed', 'queue.idx_queue', 'queue.queue_ptr'):
            assert torch.equal(sd[k], v), k


@pytest.mark.parametrize('path', [PRETRAIN, RETRIEVAL], ids=['pretrain', 'retrieval'])
def test_official_roundtrip_is_exact(path):
    "official -> vlnb -> official gives back the official state dict: same keys, dtypes, shapes and values."
    official = read_checkpoint(path)
    fmt = detect_format(official)[0]
    model = tiny_albef(16 if fmt.name == 'albef_pretrain' else 24, seed=5)
    if fmt.kind == 'retrieval': model = RetrievalModel(model)
    assert load_pretrained(model, path).ok
    back = export_official(model, fmt.name)
    assert sorted(back) == sorted(official)
    for k, v in official.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def _trained(model, batch, idx=False):
    "One optimizer step, so momentum weights, queues and pointer all differ from a fresh model."
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward(); opt.step(); opt.zero_grad()
    return model


def _batch(img_size, idx=None):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 50, (B, 8), generator=gen); ids[:, 0] = 1
    att = torch.ones(B, 8, dtype=torch.long); att[1, 6:] = 0; ids[1, 6:] = 0
    b = dict(image=torch.randn(B, 3, img_size, img_size, generator=gen), input_ids=ids, attention_mask=att)
    if idx is not None: b['idx'] = torch.tensor(idx)
    return b


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_vlnb_roundtrip_pretrain(tmp_path, suffix):
    "vlnb -> official file -> vlnb: identical state dicts (but the vlnb-only step counter) and identical outputs."
    batch = _batch(16)
    a = _trained(tiny_albef(16, seed=1), batch)
    path = save_official(a, tmp_path / f'ckpt{suffix}')
    b = tiny_albef(16, seed=2)
    rep = load_pretrained(b, path)
    assert rep.ok and rep.left_at_init == ['queue.idx_queue', 'step']
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    diff = [k for k in sa if k != 'step' and not torch.equal(sa[k], sb[k])]
    assert not diff, diff
    oa = a(batch, generator=torch.Generator().manual_seed(3))
    ob = b(batch, generator=torch.Generator().manual_seed(3))
    for f in ('loss', 'loss_itc', 'loss_itm', 'loss_mlm'): assert torch.equal(getattr(oa, f), getattr(ob, f)), f


def test_vlnb_roundtrip_retrieval(tmp_path):
    batch = _batch(24, idx=[0, 1, 0, 2])
    a = _trained(RetrievalModel(tiny_albef(24, seed=1)), batch)
    assert (a.encoders.queue.idx_queue != -100).sum() == B
    b = RetrievalModel(tiny_albef(24, seed=2))
    rep = load_pretrained(b, save_official(a, tmp_path / 'ret.pth'))
    assert rep.ok
    sa, sb = a.state_dict(), b.state_dict()
    diff = [k for k in sa if k != 'encoders.step' and '.cls.' not in k and not torch.equal(sa[k], sb[k])]
    assert not diff, diff        # the MLM head is not part of the fine-tuned format (left at init, reported)
    for m in (a, b): m.eval()
    with torch.no_grad():
        for m in (a, b):
            m._o = (m.encoders.encode_image(batch['image']), m.encoders.encode_text(batch['input_ids'], batch['attention_mask']))
        assert all(torch.equal(x, y) for x, y in zip([*a._o[0], *a._o[1]], [*b._o[0], *b._o[1]]))
    a.train(); b.train()
    oa, ob = a(batch, generator=torch.Generator().manual_seed(3)), b(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(oa.loss, ob.loss)


def test_loud_failures():
    sd = read_checkpoint(PRETRAIN)
    model = tiny_albef(16)
    bad = {k: v for k, v in sd.items() if k != 'text_encoder_m.bert.encoder.layer.2.crossattention.self.value.bias'}
    with pytest.raises(CheckpointError, match=r'MISSING 1 \(text_encoder_m\.bert\.encoder\.layer\.2\.crossattention\.self\.value\.bias\)'):
        load_pretrained(model, bad)
    with pytest.raises(CheckpointError, match='UNEXPECTED'):
        load_pretrained(model, dict(sd, **{'text_encoder.bert.encoder.layer.4.output.dense.bias': torch.zeros(12)}))
    tied = dict(sd); tied['text_encoder.cls.predictions.decoder.weight'] = tied['text_encoder.cls.predictions.decoder.weight'] + 1
    with pytest.raises(CheckpointError, match='tied'):
        load_pretrained(model, tied)
    with pytest.raises(CheckpointError, match='SHAPE MISMATCH'):
        load_pretrained(tiny_albef(16, distill=False), dict(sd, **{'itm_head.weight': torch.zeros(3, 12)}))
    rep = load_pretrained(tiny_albef(16, distill=False), sd)      # a student-only model: the teacher state is dropped
    assert rep.ok and 'text_encoder_m.bert.embeddings.word_embeddings.weight' in rep.dropped and 'image_queue' not in rep.dropped


def test_config_from_checkpoint_and_build(golden):
    cfg = albef_config_from_checkpoint(RETRIEVAL, num_heads=2, text_num_heads=2)
    assert {k: cfg.vision[k] for k in VISION if k != 'name'} == {k: v for k, v in VISION.items() if k != 'name'}
    assert cfg.vision['img_size'] == 24 and cfg.embed_dim == 8 and cfg.queue_size == 16 and cfg.distill
    for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'fusion_layer',
              'encoder_width', 'max_position_embeddings'):
        assert cfg.text[k] == TEXT[k], k
    g, x = golden['retrieval'], golden['retrieval']['inputs']
    model, rep = build_from_checkpoint(RETRIEVAL, num_heads=2, text_num_heads=2,
                                       text_overrides=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    assert rep.ok and isinstance(model, RetrievalModel)
    model.eval()
    with torch.no_grad():
        img, _ = model.encoders.encode_image(x['image'])
        txt, _ = model.encoders.encode_text(x['input_ids'], x['attention_mask'])
        ii, jj = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
        pairs = model.encoders.itm_logits(txt[jj], x['attention_mask'][jj], img[ii]).reshape(B, B, 2)
    close(pairs, g['pair_itm_logits'], 'ITM logits of a model built from the checkpoint alone')


def test_command_line(tmp_path):
    out = tmp_path / 'vlnb.safetensors'
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    r = subprocess.run([sys.executable, '-m', 'vlnb.convert', str(RETRIEVAL), str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'format albef_retrieval' in r.stdout
    sd = read_checkpoint(out)
    assert 'queue.idx_queue' in sd and sd['queue.image_queue'].shape == (16, 8)
    assert 'text_encoder.bert.encoder.layer.3.crossattention.self.key.weight' in sd
    from vlnb.convert import main
    main([str(out), str(tmp_path / 'back.pth'), '--to', 'official', '--format', 'albef_retrieval'])
    back, official = read_checkpoint(tmp_path / 'back.pth'), read_checkpoint(RETRIEVAL)
    assert sorted(back) == sorted(official) and all(torch.equal(back[k], official[k]) for k in official)


# ---- fine-tuning tasks: VQA, NLVR2 (+ text assignment), SNLI-VE ---------------------------------------------------
# The task models of make_albef_golden.py use a 12-layer BERT with fusion_layer 6 (their task code hard-codes the
# bert-base depths) and text width = image width = 8; the official files hold the students (momentum copies left out).
TASK_VISION = dict(name='vit_base_patch16_224', patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)
TASK_TEXT = dict(TEXT, hidden_size=8, intermediate_size=16, num_hidden_layers=12, fusion_layer=6, encoder_width=8)
TASK_RES, TA_RES = 16, 12


def task_albef(img_size: int = TASK_RES, seed: int = 0, distill: bool = False):
    torch.manual_seed(seed)
    cfg = albef_config('tiny', vision=dict(TASK_VISION, img_size=img_size), text=dict(TASK_TEXT), embed_dim=8, queue_size=16,
                       distill=distill, **SCHEDULE)
    return build_albef(cfg)


def vocab_tokenizer(vocab):
    "A BERT tokenizer over the generator's 50-token vocabulary ([PAD] 0, [CLS] 1, [SEP] 2, [MASK] 3, [UNK] 4, w5 ... w49)."
    from transformers import BertTokenizerFast
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def test_task_config_matches_generator(golden):
    m = golden['meta']
    assert {k: m['task_vit'][k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')} == \
           {k: TASK_VISION[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')}
    for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'fusion_layer',
              'encoder_width', 'max_position_embeddings', 'hidden_dropout_prob', 'attention_probs_dropout_prob', 'hidden_act'):
        assert m['task_bert'][k] == TASK_TEXT[k], k
    assert m['task']['image_res'] == TASK_RES and m['task_pretrain']['image_res'] == TA_RES


def test_detect_task_formats(tmp_path):
    for path, name in ((VQA, 'albef_vqa'), (NLVR, 'albef_nlvr'), (VE, 'albef_ve'), (NLVR_TA, 'albef_nlvr_ta'), (TASK_PRETRAIN, 'albef_pretrain')):
        assert detect_format(read_checkpoint(path))[0].name == name, path.name
    # refcoco.pth (perhaps a flat state dict) is model_retrieval's layout: detected as retrieval, also readable by name
    torch.save(read_checkpoint(RETRIEVAL), tmp_path / 'refcoco_like.pth')
    flat = tmp_path / 'refcoco_like.pth'
    assert detect_format(read_checkpoint(flat))[0].name == 'albef_retrieval'
    a, b = RetrievalModel(tiny_albef(24, seed=1)), RetrievalModel(tiny_albef(24, seed=2))
    ra, rb = load_pretrained(a, flat), load_pretrained(b, flat, fmt='albef_grounding')
    assert ra.ok and rb.ok and ra.loaded == rb.loaded
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in ra.loaded)      # the MLM head is left at each model's own init


def _vqa_model(golden, seed=0, **kw):
    from vlnb.tasks.vqa import VQAGenerator
    m = golden['meta']
    tok = vocab_tokenizer(m['vocab'])
    return VQAGenerator(task_albef(seed=seed), m['answers'], tok, first_twice=True, **kw), tok


def _check_ranking(gen, g, x, k, what):
    "vlnb's ranking against their rank_answer: question states, first-token logits, candidates, scores, re-ranked answers."
    d = {}
    batch = dict(image=x['image'], input_ids=x['question_ids'], attention_mask=x['question_mask'])
    with torch.no_grad():
        states, qmask = gen.question_states(batch)
        d['question_states'] = close(states, g['question_states'], f'{what}: question states')
        ids = gen.answer_input_ids
        start = gen.text_decoder(ids[:1, :1].expand(states.shape[0], 1), encoder_hidden_states=states, encoder_attention_mask=qmask).logits[:, 0]
        d['start_logits'] = close(start, g['start_logits'], f'{what}: decoder logits after [CLS]')
        top_ids, scores = gen.rank_answers(states, qmask, k)
    # candidates: their top-k by first-token probability (recomputed from their logits), scored in that order
    p_first = g['start_logits'].softmax(-1)[:, x['answer_ids'][:, 1]]
    ref_ids = p_first.topk(k, dim=1).indices
    for b in range(states.shape[0]):             # tied first tokens (w9 / w9 w10) may come in either order: match by id
        ours = dict(zip(top_ids[b].tolist(), scores[b].tolist()))
        theirs = dict(zip(ref_ids[b].tolist(), g['rank_log_probs'][b].tolist()))
        assert sorted(ours) == sorted(theirs), f'{what}: question {b} candidates {sorted(ours)} vs official {sorted(theirs)}'
        d.setdefault('scores', 0.0)
        d['scores'] = max(d['scores'], max(abs(ours[a] - theirs[a]) for a in ours))
    assert d['scores'] <= TOL, f'{what}: scores differ by {d["scores"]:.3g}'
    probs, order = scores.softmax(-1).sort(dim=1, descending=True)
    assert torch.equal(top_ids.gather(1, order), g['topk_ids']), f'{what}: re-ranked answers {top_ids.gather(1, order).tolist()} vs {g["topk_ids"].tolist()}'
    d['topk_probs'] = close(probs, g['topk_probs'], f'{what}: re-ranked probabilities')
    best = gen.predict_batch(batch, k=k)
    assert best == [gen.answer_list[i] for i in g['topk_ids'][:, 0].tolist()]
    return d


def test_vqa_parity(golden):
    "vqa.pth's layout through the converter; the answer list tokenised by vlnb as their VQA.py does; ranking as rank_answer."
    g, x = golden['vqa'], golden['vqa']['inputs']
    gen, tok = _vqa_model(golden)
    rep = load_pretrained(gen, VQA)
    assert rep.ok and rep.format == 'albef_vqa' and rep.root == ''
    assert {'encoders.vision_proj.weight', 'encoders.itm_head.weight', 'encoders.temp', 'step'} <= set(rep.left_at_init)
    # vlnb's tokenizer on the answer list == their tokenizer on `answer + '[SEP]'` (theirs adds no [SEP] by itself)
    assert torch.equal(gen.answer_input_ids, x['answer_ids']) and torch.equal(gen.answer_attention_mask, x['answer_mask'])
    gen.eval()
    d = {f'k={golden["meta"]["k_test"]}: {k}': v for k, v in _check_ranking(gen, g['rank'], x, golden['meta']['k_test'], 'vqa').items()}
    d.update({f'k=all: {k}': v for k, v in _check_ranking(gen, g['rank_all'], x, len(golden['meta']['answers']), 'vqa, all answers').items()})
    # their score counts the first token twice: official - vlnb(first_twice=False) = log p(first token | [CLS]) exactly
    gen.first_twice = False
    with torch.no_grad():
        states, qmask = gen.question_states(dict(image=x['image'], input_ids=x['question_ids'], attention_mask=x['question_mask']))
        ids, once = gen.rank_answers(states, qmask, len(golden['meta']['answers']))
    gen.first_twice = True
    lp_first = g['rank_all']['start_logits'].log_softmax(-1)[:, x['answer_ids'][:, 1]]
    ref = g['rank_all']['start_logits'].softmax(-1)[:, x['answer_ids'][:, 1]].topk(len(golden['meta']['answers']), dim=1).indices
    theirs = {(b, a): v for b in range(3) for a, v in zip(ref[b].tolist(), g['rank_all']['rank_log_probs'][b].tolist())}
    gap = torch.tensor([[theirs[(b, a)] - once[b, j].item() for j, a in enumerate(ids[b].tolist())] for b in range(3)])
    d['official - single first token = log p(first)'] = close(gap, lp_first.gather(1, ids), 'official score - log p(first) - log p(rest)')
    assert lp_first.max() < -0.5          # the doubled term is not negligible here
    # the training loss: Σ_a weight_a · (token-sum NLL of answer a) / questions (their alpha 0: the student's alone)
    t = g['train']
    gen.train()
    out = gen(dict(image=x['image'], input_ids=x['question_ids'], attention_mask=x['question_mask'], n_answers=t['n_answers'],
                   answer_input_ids=t['answer_ids'], answer_attention_mask=t['answer_mask'], answer_weights=t['weights']))
    d['train loss'] = close(out.loss, t['loss'], 'vqa: weighted answer loss')
    print('vqa max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def test_vqa_start_from_pretrain(golden):
    "Their VQA.py start (decoder = embeddings + MLM head + fusion layers of the pre-trained model) == VQAGenerator's init."
    g, x = golden['vqa'], golden['vqa']['inputs']
    from vlnb.tasks.vqa import VQAGenerator
    enc = task_albef()
    rep = load_pretrained(enc, TASK_PRETRAIN)
    assert rep.ok and sorted(rep.resized) == ['visual_encoder.pos_embed']          # 3x3 -> 4x4 patches, as their interpolation
    gen = VQAGenerator(enc, golden['meta']['answers'], vocab_tokenizer(golden['meta']['vocab']), first_twice=True).eval()
    assert gen.decoder_init['skipped'] == []
    d = _check_ranking(gen, g['init'], x, golden['meta']['k_test'], 'vqa from pre-training')
    print('vqa start max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def _pair_batch(x):
    return dict(image0=x['image0'], image1=x['image1'], input_ids=x['input_ids'], attention_mask=x['attention_mask'], label=x['targets'])


def _fused_cls(model, batch):
    with torch.no_grad(): return model.fuse(batch)[:, 0]


def test_nlvr_parity(golden):
    from vlnb.tasks.nlvr import build_nlvr_model, cross_kv_tied
    g, x = golden['nlvr'], golden['nlvr']['inputs']
    nm = build_nlvr_model(task_albef())
    rep = load_pretrained(nm, NLVR)
    assert rep.ok and rep.format == 'albef_nlvr' and rep.left_at_init == ['step']
    assert cross_kv_tied(nm.text_encoder) and nm.text_encoder.config.num_hidden_layers == 18
    nm.eval()
    b = _pair_batch(x)
    d = {}
    d['fused cls'] = close(_fused_cls(nm, b), g['finetuned']['cls'], 'nlvr: fused [CLS]')
    with torch.no_grad(): d['logits'] = close(nm.logits(b), g['finetuned']['logits'], 'nlvr: logits')
    nm.train()
    d['train loss'] = close(nm(b).loss, g['train']['loss'], 'nlvr: CE')
    print('nlvr max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def test_nlvr_ta_and_start(golden):
    """pretrain_model_nlvr.pth's layout: text-assignment logits of fixed pairs; then NLVR2 starts from it as their NLVR.py
    does (position embedding resized to the fine-tuning resolution): fused [CLS] states equal."""
    from vlnb.tasks.nlvr import build_ta_model, build_nlvr_model
    import torch.nn.functional as F
    g = golden['nlvr']
    ta = build_ta_model(task_albef(TA_RES))
    rep = load_pretrained(ta, NLVR_TA)
    assert rep.ok and rep.format == 'albef_nlvr_ta' and {'text_proj.weight', 'text_proj.bias', 'temp'} <= set(rep.dropped)
    x, t = g['inputs'], g['ta']
    ta.eval()
    with torch.no_grad():
        emb = ta.visual_encoder(t['image'])
        i0, i1 = t['pairs']
        h = ta.text_encoder(x['input_ids'], x['attention_mask'], encoder_hidden_states=[emb[i0], emb[i1]], mode='multimodal').last_hidden_state
        d = dict(ta_logits=close(ta.ta_head(h[:, 0]), t['logits'], 'TA logits'),
                 image_feat=close(F.normalize(ta.vision_proj(emb[:, 0]), dim=-1), t['image_feat'], 'TA image features'))
    nm = build_nlvr_model(ta)
    nm.visual_encoder.set_img_size(TASK_RES)
    d['start fused cls'] = close(_fused_cls(nm.eval(), _pair_batch(x)), g['init']['cls'], 'nlvr from TA: fused [CLS]')
    print('nlvr TA max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def test_ve_parity(golden):
    from vlnb.tasks.ve import build_ve_model
    g, x = golden['ve'], golden['ve']['inputs']
    vm = build_ve_model(task_albef())
    rep = load_pretrained(vm, VE)
    assert rep.ok and rep.format == 'albef_ve' and rep.left_at_init == ['step']
    b = dict(image=x['image'], input_ids=x['input_ids'], attention_mask=x['attention_mask'], label=x['targets'])
    vm.eval()
    d = {'fused cls': close(_fused_cls(vm, b), g['finetuned']['cls'], 've: fused [CLS]')}
    with torch.no_grad(): d['logits'] = close(vm.logits(b), g['finetuned']['logits'], 've: logits')
    vm.train()
    d['train loss'] = close(vm(b).loss, g['train']['loss'], 've: CE')
    enc = task_albef(seed=1)                                  # their VE.py start: the pre-training checkpoint, `bert.` dropped
    assert load_pretrained(enc, TASK_PRETRAIN).ok
    d['start fused cls'] = close(_fused_cls(build_ve_model(enc).eval(), b), g['init']['cls'], 've from pre-training: fused [CLS]')
    print('ve max abs diff:', {k: f'{v:.1e}' for k, v in d.items()})


def _task_models(golden, distill=False):
    from vlnb.tasks.nlvr import build_nlvr_model, build_ta_model
    from vlnb.tasks.ve import build_ve_model
    gen, _ = _vqa_model(golden, seed=3, distill=distill) if not distill else (None, None)
    if distill:
        from vlnb.tasks.vqa import VQAGenerator
        gen = VQAGenerator(task_albef(seed=3, distill=True), golden['meta']['answers'], vocab_tokenizer(golden['meta']['vocab']), distill=True)
    return dict(vqa=(VQA, gen), nlvr=(NLVR, build_nlvr_model(task_albef(seed=3), distill=distill)),
                ve=(VE, build_ve_model(task_albef(seed=3), distill=distill)), nlvr_ta=(NLVR_TA, build_ta_model(task_albef(TA_RES, seed=3))))


def test_task_roundtrips_are_exact(golden):
    "official -> vlnb -> official gives back each task file: same keys, dtypes and values (the tied K/V pairs under both layers)."
    for task, (path, model) in _task_models(golden).items():
        official = read_checkpoint(path)
        assert load_pretrained(model, path).ok, task
        back = export_official(model)
        if task == 'nlvr_ta':    # the TA forward never uses text_proj / temp: vlnb has no place for them, the export lacks them
            assert {k for k in official if k not in back} == {'text_proj.weight', 'text_proj.bias', 'temp'}
            official = {k: v for k, v in official.items() if k in back}
        assert sorted(back) == sorted(official), (task, sorted(set(back) ^ set(official))[:6])
        for k, v in official.items(): assert back[k].dtype == v.dtype and torch.equal(back[k], v), (task, k)


def test_task_momentum_layout(golden):
    """vlnb's momentum copies export under the official names: each task file's keys plus, for every part their model
    pairs with a momentum twin (recorded by the generator, which checked it on their full state dict), `<part>_m.*`."""
    parts = golden['meta']['momentum']
    for task, (path, model) in _task_models(golden, distill=True).items():
        if task not in parts: continue
        official = set(read_checkpoint(path))
        expect = official | {p + '_m' + k[len(p):] for k in official for p in parts[task] if k.startswith(p + '.')}
        back = export_official(model)
        assert set(back) == expect, (task, sorted(set(back) ^ expect)[:6])


def test_build_task_models_from_checkpoints(golden):
    "build_from_checkpoint reads the sizes (NLVR2's 18 layers as 6 + 6 duplicated) and builds the task model, weights loaded."
    from vlnb.tasks.vqa import VQAGenerator
    from vlnb.tasks.nlvr import NLVRModel, TextAssignmentModel
    from vlnb.tasks.ve import VEModel
    tx = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for path, cls, g in ((NLVR, NLVRModel, golden['nlvr']), (VE, VEModel, golden['ve'])):
        model, rep = build_from_checkpoint(path, num_heads=2, text_num_heads=2, text_overrides=tx)
        assert rep.ok and type(model) is cls and not model.distill
        x = g['inputs']
        b = _pair_batch(x) if cls is NLVRModel else dict(image=x['image'], input_ids=x['input_ids'], attention_mask=x['attention_mask'])
        with torch.no_grad(): close(model.eval().logits(b), g['finetuned']['logits'], f'{cls.__name__} built from the checkpoint')
    ta, rep = build_from_checkpoint(NLVR_TA, num_heads=2, text_num_heads=2, text_overrides=tx)
    assert rep.ok and type(ta) is TextAssignmentModel and ta.text_encoder.config.num_hidden_layers == 18
    with pytest.raises(ValueError, match='answer_list'): build_from_checkpoint(VQA, num_heads=2, text_num_heads=2)
    m = golden['meta']
    gen, rep = build_from_checkpoint(VQA, num_heads=2, text_num_heads=2, text_overrides=tx, answer_list=m['answers'],
                                     tokenizer=vocab_tokenizer(m['vocab']))
    assert rep.ok and type(gen) is VQAGenerator
    gen.first_twice = True
    _check_ranking(gen.eval(), golden['vqa']['rank'], golden['vqa']['inputs'], m['k_test'], 'vqa built from the checkpoint')
