"""Parity of vlnb's ALBEF with the official code (github.com/salesforce/ALBEF), and checkpoint round trips.

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

GOLDEN = Path(__file__).parent / 'golden'
PRETRAIN, RETRIEVAL = GOLDEN / 'albef_pretrain_tiny.pth', GOLDEN / 'albef_retrieval_tiny.pth'
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
