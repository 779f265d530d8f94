"""The repository explains itself: no tracked file cites the external design document by section
(the word SPEC, a space, the section sign); citations
point to docs/ pages by page and heading, and every cited page and heading exists."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
SPEC_SECTION = 'SPEC ' + chr(0xA7)      # spelt out, so this file does not cite what it forbids
FORBIDDEN = (SPEC_SECTION.encode('utf-8'), b'SPEC Appendix')
# (docs/data.md, 'BigFile') or, inside single-quoted strings, (docs/data.md, "BigFile")
CITATION = re.compile(r"""docs/([\w-]+)\.md,? (?:'([^'\n]+)'|"([^"\n]+)")""")


def tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip('not a git checkout (or git is missing): the tracked files cannot be listed')
    return [name for name in out.decode('utf-8').split('\0') if name and name != THIS]


def spec_refs(root, names):
    """['path:line: text'] of every forbidden citation in the given files (binary files included)."""
    hits = []
    for name in names:
        path = Path(root) / name
        if not path.is_file():            # tracked but deleted in the working tree
            continue
        data = path.read_bytes()
        for needle in FORBIDDEN:
            start = data.find(needle)
            while start != -1:
                line_no = data.count(b'\n', 0, start) + 1
                line = data[data.rfind(b'\n', 0, start) + 1:data.find(b'\n', start) % (len(data) + 1)]
                hits.append(f'{name}:{line_no}: {line.decode("utf-8", "replace").strip()[:120]}')
                start = data.find(needle, start + 1)
    return hits


def headings(page):
    return {line.lstrip('#').strip() for line in page.read_text(encoding='utf-8').splitlines()
            if line.startswith('#')}


def broken_citations(root, names):
    """['path:line: docs/x.md, 'Heading' (why)'] for citations of a missing page or heading."""
    bad, cache = [], {}
    for name in names:
        path = Path(root) / name
        if not path.is_file() or path.suffix in ('.png', '.jpg', '.npy', '.bin'):
            continue
        text = path.read_text(encoding='utf-8', errors='replace')
        for m in CITATION.finditer(text):
            page, heading = m.group(1), m.group(2) or m.group(3)
            doc = Path(root) / 'docs' / f'{page}.md'
            if page not in cache:
                cache[page] = headings(doc) if doc.is_file() else None
            line_no = text.count('\n', 0, m.start()) + 1
            if cache[page] is None:
                bad.append(f'{name}:{line_no}: {m.group(0)} (no page docs/{page}.md)')
            elif heading not in cache[page]:
                bad.append(f'{name}:{line_no}: {m.group(0)} (no heading {heading!r} in docs/{page}.md)')
    return bad


def test_no_tracked_file_cites_spec():
    hits = spec_refs(REPO, tracked_files())
    assert not hits, ('these lines cite the external SPEC; cite the docs/ page and heading instead, e.g. '
                      "(docs/models.md, 'Image encoders'):\n" + '\n'.join(hits))


def test_cited_docs_pages_and_headings_exist():
    bad = broken_citations(REPO, tracked_files())
    assert not bad, 'citations of docs pages or headings that do not exist:\n' + '\n'.join(bad)


def test_the_checks_find_what_they_look_for(tmp_path):
    """Both checks flag a planted file, so an empty result above means something."""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'data.md').write_text('# Data\n\n## BigFile\n\ntext\n', encoding='utf-8')
    (tmp_path / 'a.py').write_text(f'x = 1\n# see {SPEC_SECTION}1.2 for the format\n', encoding='utf-8')
    (tmp_path / 'b.md').write_text('as in SPEC Appendix A\n', encoding='utf-8')
    (tmp_path / 'c.py').write_text("# (docs/data.md, 'BigFile') and (docs/data.md, \"BigFile\")\n"
                                   "# (docs/data.md, 'Tokenizer') and (docs/nope.md, 'X')\n", encoding='utf-8')
    names = ['a.py', 'b.md', 'c.py', 'docs/data.md']
    assert spec_refs(tmp_path, names) == [f'a.py:2: # see {SPEC_SECTION}1.2 for the format',
                                         'b.md:1: as in SPEC Appendix A']
    bad = broken_citations(tmp_path, names)
    assert len(bad) == 2 and "'Tokenizer'" in bad[0] and 'docs/nope.md' in bad[1], bad
