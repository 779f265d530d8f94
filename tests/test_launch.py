"""The do_all / do_test scripts find the interpreter the same way (util/launch.sh): $PYTHON if set, else the
repository's ./.venv/bin/python when it exists, else python3; and they say which one on stderr.

The scripts run for real (bash) on a copy of the repository's shell files, with fake interpreters that only
record how they were called, so nothing is trained and nothing is installed."""
import os
import shutil
import stat
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')

# script -> (arguments, the Python file it must launch)
SCRIPTS = {
    'do_test_vatex.sh': (['ROOT', 'MODELDIR', 'cpu'], 'tester.py'),
    'do_test_msrvttcn.sh': (['ROOT', 'MODELDIR', 'cpu'], 'tester.py'),
    'do_test_mlcmr.sh': (['ROOT', 'MODELDIR', 'cpu'], 'tester.py'),
    'do_all_vatex.sh': (['ROOT', 'cpu'], 'trainer.py'),
    'do_all_msrvttcn.sh': (['ROOT', 'cpu'], 'trainer.py'),
    'do_all_mlcmr.sh': (['vatex', 'i3d_kinetics', 'parallel', 'translate', 'zh', 'ROOT', 'cpu'], 'trainer.py'),
    'do_all_toy.sh': (['ROOT', 'cpu'], 'trainer.py'),
}


def fake_python(path):
    """An executable that appends `<its path> <args>` to $RECORD and succeeds."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('#!/bin/sh\necho "$0 $*" >> "$RECORD"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def repo(tmp_path):
    """A copy of the repository's shell scripts, plus a PATH whose python3 is a fake."""
    root = tmp_path / 'repo'
    (root / 'util').mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy2(REPO / name, root / name)
    for name in ('launch.sh', 'ensure_env.sh'):
        shutil.copy2(REPO / 'util' / name, root / 'util' / name)
    system_python = fake_python(tmp_path / 'bin' / 'python3')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'MLCMR_USE_VENV', 'VIRTUAL_ENV')}
    env.update(PATH=f'{tmp_path / "bin"}{os.pathsep}{env.get("PATH", "")}', RECORD=str(tmp_path / 'record.txt'))
    return {'root': root, 'env': env, 'system_python': system_python, 'record': tmp_path / 'record.txt'}


def run_script(repo, name, extra_env=None):
    args, target = SCRIPTS[name]
    if os.path.exists(repo['record']):
        os.remove(repo['record'])
    proc = subprocess.run(['bash', str(repo['root'] / name), *args], env={**repo['env'], **(extra_env or {})},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = repo['record'].read_text().splitlines()
    launches = [c for c in calls if f' {target} ' in f'{c} ']
    assert len(launches) == 1, calls
    return launches[0].split(' ', 1)[0], proc.stderr


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_repository_venv_is_used_without_activation(repo, name):
    venv_python = fake_python(repo['root'] / '.venv' / 'bin' / 'python')
    used, stderr = run_script(repo, name)
    assert used == venv_python
    assert f'python: {venv_python}' in stderr


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_explicit_python_wins(repo, tmp_path, name):
    fake_python(repo['root'] / '.venv' / 'bin' / 'python')
    mine = fake_python(tmp_path / 'conda' / 'bin' / 'python')
    used, stderr = run_script(repo, name, {'PYTHON': mine})
    assert used == mine and f'python: {mine}' in stderr


@pytest.mark.parametrize('name', ['do_test_vatex.sh', 'do_all_mlcmr.sh'])
def test_python3_without_venv(repo, name):
    used, stderr = run_script(repo, name)
    assert used == repo['system_python'] and 'python: python3' in stderr
    assert not (repo['root'] / '.venv').exists()          # nothing was set up
