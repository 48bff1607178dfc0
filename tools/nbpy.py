"""Convert between a notebook and a 'percent' script, for editing notebooks as text.

    python tools/nbpy.py to-nb  src.py  nbs/x.ipynb   # script -> notebook (outputs empty)
    python tools/nbpy.py to-py  nbs/x.ipynb  x.py     # notebook -> script

Cell markers: `# %%` (code), `# %% [markdown]` (markdown; each line starts with '# '),
`# %% tags=["parameters"]` (code cell with tags). The notebook stays the source of truth:
convert, edit, convert back, then run `nbdev_export` and `nbdev_clean`.
"""
import json, re, sys

_hdr = re.compile(r'^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$')


def py_to_cells(text):
    cells, cur = [], None
    for line in text.splitlines():
        m = _hdr.match(line)
        if m:
            if cur is not None: cells.append(cur)
            cur = dict(kind='markdown' if m['md'] else 'code', tags=json.loads(m['tags']) if m['tags'] else [], lines=[])
            continue
        if cur is None:
            if not line.strip(): continue
            cur = dict(kind='code', tags=[], lines=[])
        cur['lines'].append(line)
    if cur is not None: cells.append(cur)
    out = []
    for c in cells:
        lines = c['lines']
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if c['kind'] == 'markdown': lines = [l[2:] if l.startswith('# ') else l.lstrip('#') for l in lines]
        src = [l + '\n' for l in lines]
        if src: src[-1] = src[-1][:-1]
        cell = dict(cell_type=c['kind'], metadata={'tags': c['tags']} if c['tags'] else {}, source=src)
        if c['kind'] == 'code': cell.update(execution_count=None, outputs=[])
        out.append(cell)
    return out


def to_nb(src, dst):
    cells = py_to_cells(open(src, encoding='utf-8').read())
    nb = dict(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    with open(dst, 'w', encoding='utf-8') as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write('\n')


def to_py(src, dst):
    nb = json.load(open(src, encoding='utf-8'))
    parts = []
    for c in nb['cells']:
        tags = c.get('metadata', {}).get('tags')
        hdr = '# %%' + (' [markdown]' if c['cell_type'] == 'markdown' else '') + (f' tags={json.dumps(tags)}' if tags else '')
        body = ''.join(c['source'])
        if c['cell_type'] == 'markdown': body = '\n'.join('# ' + l if l else '#' for l in body.split('\n'))
        parts.append(hdr + '\n' + body + '\n')
    open(dst, 'w', encoding='utf-8').write('\n'.join(parts))


if __name__ == '__main__':
    cmd, a, b = sys.argv[1:4]
    {'to-nb': to_nb, 'to-py': to_py}[cmd](a, b)
