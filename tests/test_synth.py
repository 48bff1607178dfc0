"""The embedded synthetic dataset (vlnb.data.synth): determinism, atomic builds, boxes against pixels, records against
scene graphs, answer balance and the blind (question-only) VQA baseline on the DEFAULT dataset."""
import json, os, subprocess, sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlnb.data import synth
from vlnb.data.synth import SynthConfig, generate, dataset_digest, check_dataset, summary, question_only_baseline, blind_baseline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def default_root():
    "The default dataset, in vlnb's cache (built once, ~15 s, reused by every recipe)."
    return generate(SynthConfig())


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    cfg = SynthConfig(n_images=40, seed=11)
    a, b = dataset_digest(generate(cfg, tmp_path / 'a')), dataset_digest(generate(cfg, tmp_path / 'b'))
    assert a == b and len(a) == 40 + 24   # images + 19 record files, 3 scene files, answer list, config
    c = dataset_digest(generate(SynthConfig(n_images=40, seed=12), tmp_path / 'c'))
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.startswith('images/')) == 40      # every image differs
    sa = json.loads((tmp_path / 'a' / 'scenes_train.json').read_text()); sc = json.loads((tmp_path / 'c' / 'scenes_train.json').read_text())
    assert [s['objects'] for s in sa] != [s['objects'] for s in sc]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    calls = Counter()
    real = synth.render_scene
    def flaky(*a, **k):
        calls['n'] += 1
        if calls['n'] == 7: raise KeyboardInterrupt('simulated kill')
        return real(*a, **k)
    monkeypatch.setattr(synth, 'render_scene', flaky)
    with pytest.raises(KeyboardInterrupt): generate(SynthConfig(n_images=20), tmp_path / 'ds')
    assert list(tmp_path.iterdir()) == []          # neither the dataset nor a temp folder
    monkeypatch.setattr(synth, 'render_scene', real)
    root = generate(SynthConfig(n_images=20), tmp_path / 'ds')
    assert (root / 'config.json').exists() and [p.name for p in tmp_path.iterdir()] == ['ds']


def test_cache_dir_keyed_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv('VLNB_CACHE', str(tmp_path))
    r1 = generate(SynthConfig(n_images=12)); r2 = generate(SynthConfig(n_images=12, noise=0.0))
    assert r1.parent == tmp_path / 'synth' and r1 != r2 and r1.name == SynthConfig(n_images=12).key()
    mtime = (r1 / 'config.json').stat().st_mtime_ns
    assert generate(SynthConfig(n_images=12)) == r1 and (r1 / 'config.json').stat().st_mtime_ns == mtime   # reused


@pytest.mark.parametrize('size', [32, 224, 384])
def test_image_sizes(tmp_path, size):
    root = generate(SynthConfig(n_images=10, image_size=size), tmp_path / 'd')
    im = Image.open(root / 'images' / '00000.png'); assert im.size == (size, size) and im.mode == 'RGB'
    check_dataset(root)


def test_boxes_cover_painted_pixels(tmp_path):
    "Without noise, texture or clutter: every painted pixel lies in some object's box, and each box is tight on its object."
    cfg = SynthConfig(n_images=30, noise=0, texture=0, clutter=0, colour_jitter=0, shapes=synth.SHAPES)
    root = generate(cfg, tmp_path / 'd')
    for split in synth.SPLITS:
        scenes = synth.load_scenes(root, split)
        for r in synth.load_records(root, 'grounding', split):
            assert r['bbox'] == scenes[r['image']]['objects'][r['object_id']]['box']
        for path, sc in scenes.items():
            a = np.asarray(Image.open(root / path)).astype(int)
            painted = np.abs(a - a[0, 0]).sum(-1) > 30
            inside = np.zeros_like(painted)
            for o in sc['objects']:
                x, y, w, h = o['box']
                x0, y0, x1, y1 = int(np.floor(x)) - 1, int(np.floor(y)) - 1, int(np.ceil(x + w)) + 1, int(np.ceil(y + h)) + 1
                inside[max(0, y0):y1, max(0, x0):x1] = True
                ys, xs = np.nonzero(painted[max(0, y0):y1, max(0, x0):x1])
                assert len(xs), (path, o)
                assert xs.min() + max(0, x0) <= x + 1.5 and xs.max() + max(0, x0) >= x + w - 2.5, (path, o)   # tight in x
                assert ys.min() + max(0, y0) <= y + 1.5 and ys.max() + max(0, y0) >= y + h - 2.5, (path, o)   # tight in y
            assert not (painted & ~inside).any(), path


def test_default_dataset_facts_and_balance(default_root):
    n = check_dataset(default_root)          # every VQA answer, grounding box, NLVR and VE label against the scene graphs
    assert n['vqa'] == 15000 and n['grounding'] > 5000
    s = summary(default_root, verbose=False)
    for t, b in s['vqa_balance'].items():
        if b['n_answers'] >= 3: assert b['top_share'] <= 0.40, (t, b)
        if b['yes_share'] is not None: assert 0.45 <= b['yes_share'] <= 0.55, (t, b)
    assert 0.45 <= s['nlvr_true_share'] <= 0.55
    assert len(set(s['ve_labels'].values())) == 1
    assert s['caption_vocab'] >= 80


def test_question_only_baseline_is_weak(default_root):
    r = question_only_baseline(default_root)
    print('question-only VQA accuracy (val):', r)
    assert r['n_eval'] == 1500
    assert 0.25 <= r['accuracy'] <= 0.45       # learns the priors, but not the answers
    assert r['accuracy'] >= r['prior_accuracy'] - 0.01
    n = blind_baseline(default_root, 'nlvr')
    print('statement-only NLVR accuracy (val):', n)
    assert n['accuracy'] <= 0.60
    v = blind_baseline(default_root, 've')
    print('hypothesis-only VE accuracy (val):', v)
    assert v['accuracy'] <= 0.70      # ~0.66: unrendered words still hint at neutral/contradiction (see the notebook)


def test_data_tour_notebook_runs(tmp_path):
    "nbs/data_tour.ipynb is a parameterised notebook (the `make demo` default): run it small through papermill."
    pm = Path(sys.executable).parent / 'papermill'
    out = tmp_path / 'tour.ipynb'
    r = subprocess.run([str(pm), '--cwd', str(ROOT / 'nbs'), str(ROOT / 'nbs' / 'data_tour.ipynb'), str(out),
                        '-p', 'n_images', '60', '-p', 'save_figure', 'False', '-p', 'out_dir', str(tmp_path / 'run')],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / 'run' / 'synth_samples.png').stat().st_size < 300 * 1024
    s = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert s['summary']['n_images'] == 60 and 0 <= s['blind']['vqa']['accuracy'] <= 1


def _gen_worker(root):
    return str(generate(SynthConfig(n_images=30, seed=5), root))


def test_concurrent_generate_one_dataset(tmp_path):
    "Two processes building the same dataset at once (e.g. two ranks): both get the same finished folder."
    import multiprocessing as mp
    with mp.get_context('spawn').Pool(2) as pool: roots = pool.map(_gen_worker, [tmp_path / 'ds'] * 2)
    assert roots[0] == roots[1] and [p.name for p in tmp_path.iterdir()] == ['ds']
    check_dataset(roots[0])
    assert dataset_digest(roots[0]) == dataset_digest(generate(SynthConfig(n_images=30, seed=5), tmp_path / 'ref'))
