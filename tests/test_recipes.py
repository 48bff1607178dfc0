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
    'train_ve': dict(n_images=60, pretrain_steps=8, max_steps=64, batch_size=8, log_every=16, lr=1e-3),
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
