"""Evaluate a trained checkpoint, or a multilingual CLIP text model with no training, on a test split.

Checkpoints of NRCCR, MLCMR and mclip (docs/evaluation.md).

    python tester.py --rootpath ~/VisualSearch --collection vatex --logger_name RUN_DIR
    python tester.py --rootpath ~/VisualSearch --collection vatex --checkpoint path/to/model_best.pth.tar
    python tester.py --rootpath ~/VisualSearch --collection vatex --visual_feature clip_vit_b32 \
        --text_model sentence-transformers/clip-ViT-B-32-multilingual-v1          # zero-shot, no training

Zero-shot (--text_model): the untrained multilingual CLIP model (model.zero_shot_model) over CLIP features made by
the CLIP the text model is aligned to, with the protocol of the NRCCR caption files (--data_type), the same fusion
sweep and the same output files, in <rootpath>/<collection>/results/zero_shot/<text model>/<feature>_<split>.

The model and the data it reads come from the checkpoint (`model_cfg`, `data_cfg`; ours, or the original
NRCCR release format); the command line overrides the data settings it names. Results go to --results_dir
(default <rootpath>/<collection>/results/<run>/...): metrics.json (per fusion weight), report.txt (the
paper-style tables), sims_<label>.npy ([captions, videos] fused similarities), sims_primary.npy /
sims_second.npy, caption_ids.txt and video_ids.txt. Metrics are computed on float64 similarity matrices;
the .npy files store them as float32 (half the disk). With --save_embeddings 1 also the embeddings the
metrics were computed from (float32): video_emb.npy [videos, D] (rows in video_ids.txt order) and
caption_emb_primary.npy / caption_emb_second.npy [captions, D] (rows in caption_ids.txt order);
evaluation.similarity(caption_emb_<role>, video_emb) rebuilds the float64 matrix the metrics ranked.
"""
import argparse
import fnmatch
import json
import logging
import os
import time

import numpy as np

import evaluation
import model as models
from basic import paths
from basic.errors import DataError
from basic import checkpoint as ckpt
from basic import data_provider as dp
from basic import distributed as dist
from basic import image_data
from basic import replacement
from basic import runs
from basic.precision import AMP_CHOICES, amp_log_level, autocast_factory, resolve_amp

logger = logging.getLogger('mlcmr')

# Above this many caption x video entries, --save_sims auto streams the metrics from the embeddings instead
# of building the [captions, videos] matrices (50M float64 entries = 400 MB per matrix).
SIMS_AUTO_LIMIT = 50_000_000

# Files of a results folder besides sims_*.npy and caption_emb_*.npy (basic/replacement.py replaces them
# all on --overwrite 1; anything else in the folder is left alone).
RESULT_FILES = ('metrics.json', 'report.txt', 'test.log', 'caption_ids.txt', 'video_ids.txt', 'video_emb.npy')

# data_cfg keys the command line may override (None: the checkpoint's value)
DATA_OVERRIDES = ('collection', 'visual_feature', 'data_type', 'train_mode', 'label_situation', 'target_language',
                  'bert_name', 'strict', 'task', 'clean_eval', 'frame_sampling')


def get_args_parser():
    p = argparse.ArgumentParser('MLCMR tester', add_help=False)
    p.add_argument('--rootpath', default=os.path.join(os.path.expanduser('~'), 'VisualSearch'))
    p.add_argument('--collection', '--testCollection', dest='collection', default=None,
                   help='test collection (default: the one the model was trained on)')
    p.add_argument('--logger_name', default=None, help='run directory holding the checkpoint')
    p.add_argument('--checkpoint_name', default='model_best.pth.tar', help='file inside --logger_name')
    p.add_argument('--checkpoint', default=None, help='explicit checkpoint path (overrides --logger_name)')
    p.add_argument('--text_model', default=None,
                   help='zero-shot instead of a checkpoint: a multilingual CLIP text model (sentence-transformers '
                        'folder or hub id, e.g. sentence-transformers/clip-ViT-B-32-multilingual-v1) or a CLIP '
                        'model; needs --collection and CLIP features of that CLIP (--visual_feature)')
    p.add_argument('--model_type', default=None, choices=['video', 'img'],
                   help='zero-shot: video or image collection (default: img for multi30k, mscoco, toyimg)')
    p.add_argument('--frame_sampling', default=None, choices=['first', 'uniform'],
                   help='videos over 64 frames: the first 64 or 64 spread over the video (default: the '
                        'checkpoint\'s; zero-shot: first, as training does by default)')
    p.add_argument('--split', default='test', help='caption-file split (test)')
    p.add_argument('--visual_feature', default=None, help='default: the training feature')
    p.add_argument('--target_language', default=None, choices=['zh', 'en'],
                   help='MLCMR: query language (default: the training target)')
    p.add_argument('--train_mode', default=None, choices=['parallel', 'unparallel'],
                   help='MLCMR: selects the fusion weight (default: from the checkpoint)')
    p.add_argument('--label_situation', default=None, choices=['human_label', 'translate'],
                   help='MLCMR: selects the fusion weight (default: from the checkpoint)')
    p.add_argument('--data_type', default=None,
                   help='NRCCR: default from the checkpoint (google_enc2zh; images e.g. google_enc2de)')
    p.add_argument('--task', type=int, default=None, choices=[1, 2],
                   help='images: Multi-30K task of the test files (default: the training run\'s)')
    p.add_argument('--clean_eval', default=None, choices=['raw', 'en'],
                   help='images: English MT tokenised raw (parity) or cleaned (default: the training run\'s)')
    p.add_argument('--bert_name', default=None,
                   help='tokenizer (and, for original release checkpoints, BERT config) source; default from the '
                        'checkpoint')
    p.add_argument('--eval_batch_size', type=int, default=None,
                   help='default NRCCR 64, MLCMR 16 (parity: padded pooling depends on batch composition)')
    p.add_argument('--results_dir', default=None)
    p.add_argument('--save_sims', default='auto', choices=['auto', '1', '0'],
                   help='save the [captions, videos] similarity matrices (.npy); auto: when at most '
                        f'{SIMS_AUTO_LIMIT:,} entries, else metrics are streamed from embeddings')
    p.add_argument('--save_embeddings', type=int, default=0, choices=[0, 1],
                   help='1: also save the caption embeddings per role and the video embeddings (float32 .npy: '
                        'video_emb.npy, caption_emb_<role>.npy; l2-normalised rows when the metrics are streamed)')
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=int, default=5)
    p.add_argument('--amp', default='off', choices=AMP_CHOICES,
                   help="autocast of the encoders (docs/training.md, 'Mixed precision'): off = fp32 (default); "
                        'bf16 needs native bf16 (else an error); auto = bf16 where native, fp32 elsewhere; '
                        'after training, the trainer passes the precision it trained in')
    p.add_argument('--strict', type=runs.bool_flag, default=None,
                   help='0: skip captions whose partner caption is missing; 1: error (default: the training run\'s)')
    p.add_argument('--overwrite', type=int, default=0, help='1: evaluate again even if results exist')
    g = p.add_argument_group('Compatibility (accepted, no effect)')
    g.add_argument('--collectionStrt', default='single', choices=['single'], help='collection structure')
    return p


def results_dir_for(rootpath, collection, split, ckpt_path, target_language):
    run = os.path.normpath(os.path.dirname(os.path.abspath(ckpt_path))).split(os.sep)[-2:]
    stem = os.path.basename(ckpt_path).split('.')[0]
    suffix = f'_{target_language}' if target_language else ''
    return os.path.join(rootpath, collection, 'results', *run, f'{stem}_{split}{suffix}')


# ============ steps ============

def checkpoint_path(args):
    if args.checkpoint is not None:
        return args.checkpoint
    if args.logger_name is None:
        raise DataError('give --logger_name RUN_DIR or --checkpoint FILE (or --text_model NAME for zero-shot)')
    return os.path.join(args.logger_name, args.checkpoint_name)


def load_for_test(args):
    """(model, what it is: the checkpoint path or the zero-shot text model, data config, results folder)."""
    if args.text_model is not None:
        return zero_shot_setup(args)
    path = checkpoint_path(args)
    model, train_args = models.load_model(path, args.bert_name)
    data_cfg = data_cfg_for_test(args, path, train_args)
    out_dir = args.results_dir or results_dir_for(args.rootpath, data_cfg['collection'], args.split, path,
                                                  dp.target_language(data_cfg))
    return model, path, data_cfg, out_dir


def zero_shot_data_cfg(args):
    """The data config of a zero-shot test: the NRCCR caption files of the collection (video, or image by its
    name / --model_type), the CLIP features, the text model as tokenizer."""
    if args.checkpoint is not None or args.logger_name is not None:
        raise DataError('give --text_model (zero-shot) or a checkpoint (--logger_name / --checkpoint), not both')
    if not args.collection:
        raise DataError(f'--text_model {args.text_model}: pass --collection, the collection to test on')
    image = (args.model_type or ('img' if image_data.is_image_collection(args.collection) else 'video')) == 'img'
    if image:
        img = dict(model_type='img', img_encoder='clip', task=args.task or 1, clean_eval=args.clean_eval or 'raw')
        feature = args.visual_feature or image_data.default_feature(args.collection, 'clip')
        data_type = args.data_type or image_data.default_data_type(args.rootpath, args.collection)
    elif not args.visual_feature:
        raise DataError(f'--text_model {args.text_model}: pass --visual_feature, the folder of CLIP features under '
                        f'{paths.collection_dir(args.rootpath, args.collection)}/FeatureData '
                        '(util/extract_features.py writes them)')
    else:
        img, feature, data_type = {}, args.visual_feature, args.data_type or 'google_enc2zh'
    return dp.data_config(model=models.ZERO_SHOT.CAPTIONS, collection=args.collection, visual_feature=feature,
                          data_type=data_type, bert_name=args.text_model, strict=bool(args.strict),
                          frame_sampling=args.frame_sampling or 'first', **img)


def zero_shot_setup(args):
    data_cfg = zero_shot_data_cfg(args)
    store = dp.open_store(args.rootpath, data_cfg, args.split)
    folder = store.path if os.path.isdir(store.path) else os.path.dirname(store.path)
    model = models.zero_shot_model(args.text_model, folder, store.dim)
    tag = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in args.text_model.strip('/'))
    out_dir = args.results_dir or os.path.join(args.rootpath, args.collection, 'results', 'zero_shot', tag,
                                               f'{data_cfg["visual_feature"]}_{args.split}')
    return model, f'zero-shot {args.text_model}', data_cfg, out_dir


def data_cfg_for_test(args, path, train_args):
    """The checkpoint's data config (derived from its stored arguments when it predates `data_cfg`), with
    the command line's overrides."""
    cfg = dp.checkpoint_data_config(path, train_args)
    for key in DATA_OVERRIDES:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if not cfg['collection']:
        raise DataError(f'{path}: the checkpoint does not name its collection; pass --collection')
    return cfg


def existing_results(out_dir, overwrite):
    metrics_path = os.path.join(out_dir, 'metrics.json')
    if overwrite or not os.path.exists(metrics_path):
        return None
    print(f'results exist, skipping (pass --overwrite 1 to evaluate again): {metrics_path}')
    with open(metrics_path) as f:
        return {'results_dir': out_dir, 'metrics': json.load(f), 'skipped': True}


def is_results_file(name):
    """A file the tester writes into its results folder (what --overwrite 1 replaces)."""
    return name in RESULT_FILES or fnmatch.fnmatch(name, 'sims_*.npy') or \
        fnmatch.fnmatch(name, 'caption_emb_*.npy') or ckpt.is_temp_name(name)


def results_replacement(out_dir):
    """The results folder's replacement (basic/replacement.py; the commit mark is metrics.json), after
    finishing or undoing one a kill interrupted."""
    folder = replacement.Replacement(out_dir, is_results_file,
                                     lambda d: os.path.isfile(os.path.join(d, 'metrics.json')),
                                     aside='.previous_results', what='results')
    recovered = folder.recover()
    if recovered:
        logger.warning('%s: %s', out_dir, recovered)
    return folder


def open_results_dir(out_dir, path):
    os.makedirs(out_dir, exist_ok=True)
    ckpt.remove_stale_temp_files(out_dir)
    runs.attach_log_file(os.path.join(out_dir, 'test.log'))
    logger.info('checkpoint %s -> %s', path, out_dir)


def build_test_data(args, data_cfg, model, target):
    """Captions and visual store of the test split (images: the split's own id file and features)."""
    tokenizer = type(model).build_tokenizer(data_cfg)
    store = dp.open_store(args.rootpath, data_cfg, args.split)
    if store.dim != model.cfg['visual_feat_dim']:
        raise DataError(f'{store.path}: features have {store.dim} dims but the checkpoint expects '
                        f'{model.cfg["visual_feat_dim"]}; pass the --visual_feature the model was trained with')
    return dp.EvalData(args.rootpath, data_cfg, args.split, tokenizer, store, purpose='test', target_language=target)


def encode(args, model, data, device, batch_size):
    """(texts, videos, sims): caption and video embeddings; `sims` the float64 [captions, videos] matrices
    per role, or None when the gallery is streamed (then the embeddings come back l2-normalised, float32).
    Precision: --amp resolved for the device (basic/precision.py); batching: evaluation.encode_split."""
    amp, message = resolve_amp(args.amp, device)
    logger.log(amp_log_level(args.amp, amp), '%s', message)
    autocast = autocast_factory(amp, device)
    start = time.perf_counter()
    texts, videos = evaluation.encode_split(model, data, batch_size, device, args.workers, autocast)
    logger.info('encoded %d videos and %d captions x %d streams in %.1f s (%s caption batches of %d)',
                len(data.videos), len(data.table), len(texts), time.perf_counter() - start,
                'length-bucketed' if model.cfg.get('masked_pooling', False) else 'file-order', batch_size)
    entries = len(data.table) * len(data.videos)
    if args.save_sims == '1' or (args.save_sims == 'auto' and entries <= SIMS_AUTO_LIMIT):
        return texts, videos, {role: evaluation.similarity(emb, videos) for role, emb in texts.items()}
    logger.info('%d x %d gallery: metrics streamed from embeddings, similarity matrices not saved',
                len(data.table), len(data.videos))
    return ({role: evaluation.l2_normalize(emb) for role, emb in texts.items()}, evaluation.l2_normalize(videos),
            None)


def score_sweep(model, data, data_cfg, texts, videos, sims, device, out_dir):
    """Metrics per fusion weight of the model's sweep; saves the fused matrices when they exist."""
    sweep = model.fusion_sweep(target_language=data_cfg['target_language'], train_mode=data_cfg['train_mode'],
                               label_situation=data_cfg['label_situation'])
    primary, second = paths.ROLE_PRIMARY, paths.ROLE_SECOND
    results, report = {}, []
    for label, w in sweep:
        if sims is None:        # streamed: float32 embeddings, the float64 matrix is never built
            t, v = evaluation.fusion_embeddings(texts[primary], texts[second], videos, w, model.fusion_normalize,
                                                device)
            metrics = evaluation.compute_metrics_from_embeddings(t, v, data.cap2vid, device=device)
        else:
            if model.fusion_normalize:
                fused = evaluation.fuse(sims[primary], sims[second], w)
            else:
                fused = w * sims[primary] + (1 - w) * sims[second]
            metrics = evaluation.compute_metrics(fused, data.cap2vid)
            np.save(os.path.join(out_dir, f'sims_{label}.npy'), fused.numpy().astype(np.float32))
        results[label] = metrics
        report.append(evaluation.format_table(metrics, title=f'{data_cfg["collection"]} {data.split} {label} '
                                              f'(weight {w:g} on {data.table.files[primary]})'))
    return results, '\n\n'.join(report)


def write_results(out_dir, ckpt_path, data, sims, results, report, embeddings=None):
    """ids, report, the (texts, videos) `embeddings` when given and, last (atomically), metrics.json: its
    presence means the test is complete."""
    if sims is not None:
        for role, s in sims.items():
            np.save(os.path.join(out_dir, f'sims_{role}.npy'), s.numpy().astype(np.float32))
    if embeddings is not None:
        texts, videos = embeddings
        np.save(os.path.join(out_dir, 'video_emb.npy'), videos.numpy().astype(np.float32))
        for role, emb in texts.items():
            np.save(os.path.join(out_dir, f'caption_emb_{role}.npy'), emb.numpy().astype(np.float32))
    with open(os.path.join(out_dir, 'caption_ids.txt'), 'w') as f:
        f.write('\n'.join(data.table.cap_ids) + '\n')
    with open(os.path.join(out_dir, 'video_ids.txt'), 'w') as f:
        f.write('\n'.join(data.videos) + '\n')
    with open(os.path.join(out_dir, 'report.txt'), 'w') as f:
        f.write(f'checkpoint: {ckpt_path}\ncaptions: {", ".join(data.table.files.values())}\n\n{report}\n')
    runs.atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(results, indent=2))
    print(report)
    print(f'results written to {out_dir}')
    return {'results_dir': out_dir, 'metrics': results}


# ============ main ============

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()])
    return runs.run_cli(_main, parser.parse_args(argv))


def _main(args):
    runs.setup_logging(None)                # test.log follows once the results folder is written
    device = dist.resolve_device(args.device)
    model, path, data_cfg, out_dir = load_for_test(args)
    model.to(device)
    target = dp.target_language(data_cfg)
    results_folder = results_replacement(out_dir)
    done = existing_results(out_dir, args.overwrite)
    if done is not None:
        return done
    data = build_test_data(args, data_cfg, model, target)     # every input read before the folder is written
    # --overwrite 1: the previous results wait aside until the new metrics.json (docs/evaluation.md, 'Testers')
    with results_folder.attempt(replace=bool(args.overwrite)):
        open_results_dir(out_dir, path)
        batch_size = args.eval_batch_size or type(model).RUN_DEFAULTS['test_batch_size']
        texts, videos, sims = encode(args, model, data, device, batch_size)
        results, report = score_sweep(model, data, data_cfg, texts, videos, sims, device, out_dir)
        written = write_results(out_dir, path, data, sims, results, report,
                                embeddings=(texts, videos) if args.save_embeddings else None)
        results_folder.commit()
    return written


if __name__ == '__main__':
    main()
