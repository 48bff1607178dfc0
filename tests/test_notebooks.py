"""One test per notebook in nbs/: runs it top to bottom (as `nbdev_test` does) in a fresh process.

Recipe notebooks (those with a cell tagged `parameters`) are run by tests/test_recipes.py through papermill with
smaller settings instead.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'


def is_recipe(nb: Path) -> bool:
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    return any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells)


NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if not p.name.startswith(('_', '.')) and '.ipynb_checkpoints' not in str(p)
                   and not is_recipe(p))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook(nb):
    nbdev_test = Path(sys.executable).parent / 'nbdev_test'
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    r = subprocess.run([str(nbdev_test), '--path', str(nb), '--do_print'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f'{nb.name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}'


def test_notebooks_found():
    assert (NBS / '00_core.ipynb') in NOTEBOOKS and len(NOTEBOOKS) >= 2
