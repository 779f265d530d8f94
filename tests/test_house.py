"""The house (issue #11, items 9, 12, 13, 14, 15, 16): no import circles, the data config, the explicit
discriminator step in one shared train_step, short recipes, the run-folder hash, float64 similarities."""
import ast
import contextlib
import copy
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation
import loss as losses
import model as models
import tester
import trainer
from basic import paths
from conftest import REPO, tiny_train_argv
from test_model import mlcmr_batch, nrccr_batch, small_cfg
from basic import data_provider as dp
from basic import runs


def modules_after_import(statement):
    code = f'import sys; {statement}; print(" ".join(sorted(sys.modules)))'
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


# ============ item 12: no circles ============

def test_tester_does_not_import_trainer():
    assert 'trainer' not in modules_after_import('import tester')


def test_evaluation_does_not_import_the_data_layer():
    loaded = modules_after_import('import evaluation')
    assert 'basic.data_provider' not in loaded and 'trainer' not in loaded and 'tester' not in loaded


def _python_files(folder):
    return sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob('*.py'))


LOWER = ['model.py', 'loss.py', 'evaluation.py'] + _python_files('util') + _python_files('basic') + _python_files('nets')


def _imported_roots(name):
    tree = ast.parse((REPO / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split('.')[0])
    return imported


# What each layer may import of the project (issue #17 item 2): basic/ is the library every program imports and
# imports nothing of ours above it; the method (loss, evaluation, nets/, model.py) imports basic/ and itself;
# util/ (what a person runs, and the search engine) may import anything but the command lines.
PROJECT = {'basic', 'nets', 'util', 'model', 'loss', 'evaluation', 'trainer', 'tester', 'search'}
ALLOWED = {'basic': {'basic'}, 'loss': set(), 'evaluation': {'basic', 'loss'},
           'nets': {'basic', 'nets', 'loss', 'evaluation'}, 'model': {'basic', 'nets', 'loss', 'evaluation'}}


@pytest.mark.parametrize('name', [n for n in LOWER if not n.startswith('util/')])
def test_library_and_method_import_only_below_them(name):
    layer = name.split('/')[0].removesuffix('.py')
    assert _imported_roots(name) & PROJECT <= ALLOWED[layer], name


def test_util_holds_tools_and_basic_the_library():
    """A tool is a script a person runs (it has a __main__ block); the only library module left in util/ is the
    search engine (searcher.py, with the page that serves it), imported by search.py."""
    engines = {'util/searcher.py', 'util/search_page.py'}
    for name in _python_files('util'):
        if name.endswith('__init__.py') or name in engines:
            continue
        assert "__name__ == '__main__'" in (REPO / name).read_text(), f'{name} is no tool: move it to basic/'
    for name in _python_files('basic'):
        assert "__name__ == '__main__'" not in (REPO / name).read_text() or name == 'basic/video2frames.py', name


@pytest.mark.parametrize('name', LOWER)
def test_lower_layers_never_import_the_clis(name):
    assert not _imported_roots(name) & {'trainer', 'tester', 'search'}, name


def test_shared_pieces_live_in_the_lower_layers():
    from basic import precision, training
    assert runs.bool_flag('on') is True and runs.bool_flag('0') is False
    assert precision.autocast_factory('off', torch.device('cpu')) is contextlib.nullcontext
    assert inspect.signature(dp.EvalData).parameters.keys() >= {'rootpath', 'data_cfg', 'split'}
    assert list(inspect.signature(training.train_step).parameters)[:7] == [
        'model', 'ddp_model', 'batch', 'optimizers', 'scaler', 'autocast', 'grad_clip']
    assert models.NRCCR.RUN_DEFAULTS['batch_size'] == 128 and models.MLCMR.RUN_DEFAULTS['test_batch_size'] == 16


# ============ item 13: the data config ============

@pytest.fixture(scope='module')
def short_run(toy_root):
    return trainer.main(tiny_train_argv(toy_root, 'house', '--num_epochs', '1', '--skip_test', '1'))


def test_checkpoint_stores_the_data_config(short_run, toy_root):
    saved = torch.load(os.path.join(short_run['run_dir'], 'model_best.pth.tar'), weights_only=True)
    args = trainer.parse_args(tiny_train_argv(toy_root, 'house', '--num_epochs', '1', '--skip_test', '1'))
    assert saved['data_cfg'] == trainer.data_cfg_from_args(args)
    assert set(saved['data_cfg']) == set(dp.DATA_DEFAULTS) and saved['data_cfg']['collection'] == 'toy'
    assert all(isinstance(v, (str, bool, int, type(None))) for v in saved['data_cfg'].values())


def test_tester_reads_the_stored_data_config_and_overrides(short_run, toy_root, tmp_path):
    """The stored data_cfg wins over stored args; the command line wins over both; an old checkpoint
    without data_cfg derives it from its args."""
    path = os.path.join(short_run['run_dir'], 'model_best.pth.tar')
    saved = torch.load(path, weights_only=True)
    common = ['--rootpath', toy_root, '--device', 'cpu', '--workers', '0']

    stored = dict(saved, args=dict(saved['args'], visual_feature='not_there', data_type='bogus'))
    torch.save(stored, tmp_path / 'stored.pth.tar')
    a = tester.main(common + ['--checkpoint', str(tmp_path / 'stored.pth.tar'), '--results_dir', str(tmp_path / 'a')])

    old = {k: v for k, v in saved.items() if k != 'data_cfg'}
    torch.save(old, tmp_path / 'old.pth.tar')
    b = tester.main(common + ['--checkpoint', str(tmp_path / 'old.pth.tar'), '--results_dir', str(tmp_path / 'b')])
    assert a['metrics'] == b['metrics']

    with pytest.raises(SystemExit) as e:            # a command-line override reaches the data layer
        tester.main(common + ['--checkpoint', path, '--results_dir', str(tmp_path / 'c'),
                              '--data_type', 'google_enc2xx'])
    assert 'xx' in str(e.value)


def test_tester_data_config_of_release_style_args():
    cfg = dp.data_config_from_train_args({'trainCollection': 'vatex', 'model': 'nrccr', 'visual_feature': 'i3d'})
    assert cfg == dict(dp.DATA_DEFAULTS, collection='vatex', visual_feature='i3d')


# ============ item 14: the discriminator step is explicit; set_distributed ============

def old_order_step(model, batch, opts, clip):
    """The step as it ran before (discriminator step inside the loss), written out by hand."""
    out = model(batch)
    D = model.discriminator
    real = D(out['E_src'].detach().float(), out['m_src'])
    fake = D(out['E_tr'].detach().float(), out['m_tr'])
    loss_d = 0.5 * (losses.gan_loss(real, True) + losses.gan_loss(fake, False))
    params = list(D.parameters())
    for p, g in zip(params, torch.autograd.grad(loss_d, params)):
        p.grad = g
    opts['disc'].step()
    loss, _ = model.training_loss(out)
    opts['main'].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.main_parameters(), clip)
    opts['main'].step()


@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
def test_train_step_is_bit_identical_to_the_old_order(toy_root, name):
    from basic.training import train_step
    torch.manual_seed(0)
    cfg = small_cfg(toy_root, name, **({'disc_type': 'strong'} if name == 'nrccr' else {}))
    a = models.build_model(cfg).train()
    b = copy.deepcopy(a)
    opts_a, opts_b = a.configure_optimizers(1e-3, 1e-3), b.configure_optimizers(1e-3, 1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    for step in range(3):
        torch.manual_seed(10 + step)
        batch = nrccr_batch() if name == 'nrccr' else mlcmr_batch()
        torch.manual_seed(100 + step)           # dropout
        if name == 'nrccr':
            old_order_step(a, batch, opts_a, 2.0)
        else:
            loss, _ = a.training_loss(a(batch))
            opts_a['main'].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(a.main_parameters(), 2.0)
            opts_a['main'].step()
        torch.manual_seed(100 + step)
        logs = train_step(b, b, batch, opts_b, scaler, contextlib.nullcontext, 2.0)
        assert ('loss_disc' in logs) == (name == 'nrccr')
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_training_loss_no_longer_steps_the_discriminator(toy_root):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'nrccr'))
    model.configure_optimizers(1e-3)
    before = [p.detach().clone() for p in model.discriminator.parameters()]
    model.training_loss(model(nrccr_batch()))
    assert all(torch.equal(p, q) for p, q in zip(before, model.discriminator.parameters()))


def test_set_distributed(toy_root):
    model = models.build_model(small_cfg(toy_root, 'mlcmr'))
    gather, sync = (lambda x: torch.cat([x, x])), (lambda grads: None)
    model.set_distributed(gather, sync, 2)
    assert model.gather is gather and model.grad_sync is sync and model.world_size == 2
    assert 'model.gather' not in inspect.getsource(trainer)         # the trainer calls the method


# ============ item 15: recipes ============

@pytest.mark.parametrize('module', [trainer, tester])
def test_main_reads_as_a_short_recipe(module):
    body = [line for line in inspect.getsource(module._main).splitlines()[1:] if line.strip()]
    assert len(body) <= 25, len(body)


# ============ item 16: the run-folder hash, compatibility flags, dead values, roles, easydict ============

def run_dir_of(root, *extra):
    return runs.run_dir(trainer.parse_args(tiny_train_argv(root, 'h', *extra)))


def test_bert_name_changes_the_run_folder(toy_root):
    assert run_dir_of(toy_root) != run_dir_of(toy_root, '--bert_name', 'bert-base-uncased')


@pytest.mark.parametrize('extra', [['--collectionStrt', 'single'], ['--model_type', 'video'], ['--text_layer', '3'],
                                   ['--momentum', '0.9'], ['--optim', 'adam'], ['--measure', 'cosine'],
                                   ['--text_norm'], ['--visual_norm'], ['--text_pooling', 'mean'],
                                   ['--video_pooling', 'mean'], ['--gru_pool', 'mean'], ['--val_metric', 'recall'],
                                   ['--workers', '3'], ['--skip_test', '1']])
def test_no_op_flags_keep_the_run_folder(toy_root, extra):
    assert run_dir_of(toy_root, *extra) == run_dir_of(toy_root)


def test_result_flags_change_the_run_folder(toy_root):
    base = run_dir_of(toy_root)
    for extra in (['--tri_alpha', '0.5'], ['--eval_batch_size', '4'], ['--amp', 'bf16'], ['--seed', '1']):
        assert run_dir_of(toy_root, *extra) != base, extra


def test_compatibility_flags_have_their_own_help_heading():
    parser = trainer.get_args_parser()
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert groups['Compatibility (accepted, no effect)'] == set(runs.COMPAT_ARGS)
    help_text = parser.format_help()
    assert help_text.index('Compatibility (accepted, no effect)') < help_text.index('\n  --collectionStrt')


def test_dead_values_are_gone(toy_root):
    args = trainer.parse_args(tiny_train_argv(toy_root, 'h'))
    assert not hasattr(args, 'test_batch_size') and 'eval_workers' not in runs.NON_CONFIG_ARGS


def string_literals(path):
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


@pytest.mark.parametrize('name', ['model.py', 'basic/data_provider.py', 'tester.py', 'trainer.py'])
def test_caption_roles_are_named_constants(name):
    assert not string_literals(REPO / name) & {'src', 'tr', 'bt', 'primary', 'second', 'half', '_masked'}
    assert (paths.ROLE_SRC, paths.ROLE_TR, paths.ROLE_BT, paths.ROLE_PRIMARY, paths.ROLE_SECOND) == \
        ('src', 'tr', 'bt', 'primary', 'second')
    assert paths.masked_role(paths.ROLE_EN) == 'en_masked'


def test_easydict_is_not_required():
    assert 'easydict' not in (REPO / 'requirements.txt').read_text()
    assert 'easydict' not in (REPO / 'util' / 'ensure_env.sh').read_text()


# ============ item 9: float64 similarity matrices ============

def test_similarity_is_float64_from_float32_embeddings():
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(30, 16, generator=g), torch.randn(7, 16, generator=g)
    sims = evaluation.similarity(t, v)
    assert sims.dtype == torch.float64
    tn = t.double().numpy()
    vn = v.double().numpy()
    ref = (tn / np.linalg.norm(tn, axis=1, keepdims=True)) @ (vn / np.linalg.norm(vn, axis=1, keepdims=True)).T
    np.testing.assert_allclose(sims.numpy(), ref, rtol=0, atol=1e-15)


def test_float64_keeps_ranks_that_float32_merges():
    """Two videos whose similarities to a caption differ by less than float32 resolves: float64 ranks the
    ground truth first; a float32 matrix would tie them and rank by index."""
    t = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.tensor([[1.0, 1e-4, 0.0], [1.0, 0.0, 0.0]])       # video 1 is the caption's (cos 1 vs 1 - 5e-9)
    cap2vid = torch.tensor([1])
    assert evaluation.compute_metrics(evaluation.similarity(t, v), cap2vid)['t2v_r1'] == 100.0
    f32 = evaluation.l2_normalize(t) @ evaluation.l2_normalize(v).T
    assert evaluation.compute_metrics(f32, cap2vid)['t2v_r1'] == 0.0


def test_validation_matrices_are_float64(short_run, toy_root):
    args = trainer.parse_args(tiny_train_argv(toy_root, 'house'))
    model, _ = models.load_model(os.path.join(short_run['run_dir'], 'model_best.pth.tar'))
    tok = dp.build_tokenizer(args.bert_name, True)
    store = dp.FrameStore(paths.feature_dir(toy_root, 'toy', 'toy_feature'))
    val = dp.EvalData(toy_root, trainer.data_cfg_from_args(args), 'val', tok, store, purpose='val')
    sims = trainer.embed_split(model, val, 8, torch.device('cpu'), 0, contextlib.nullcontext, False)
    assert all(s.dtype == torch.float64 for s in sims.values())


def test_tester_data_config_of_an_original_release_checkpoint(toy_root, tmp_path):
    import argparse
    from test_model import to_release_format
    torch.manual_seed(0)
    cfg = small_cfg(toy_root, 'nrccr')
    opt = argparse.Namespace(collection='toy', text_num_attention=4, visual_num_attention=4, disc_type='weak',
                             layer_list=['layer.2', 'layer.3'], frozen='frozen', visual_feature='toy_feature')
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'model': to_release_format(models.build_model(cfg)), 'best_rsum': 1.0, 'opt': opt}, path)
    _, train_args = models.load_model(str(path), bert_name=cfg['bert_name'])
    args = tester.get_args_parser().parse_args(['--checkpoint', str(path), '--bert_name', cfg['bert_name']])
    data_cfg = tester.data_cfg_for_test(args, str(path), train_args)
    assert data_cfg == dict(dp.DATA_DEFAULTS, model='nrccr', collection='toy', visual_feature='toy_feature',
                            bert_name=cfg['bert_name'])
