"""Evaluate a trained NRCCR or MLCMR checkpoint on a test split (docs/evaluation.md).

    python tester.py --rootpath ~/VisualSearch --collection vatex --logger_name RUN_DIR
    python tester.py --rootpath ~/VisualSearch --collection vatex --checkpoint path/to/model_best.pth.tar

The model, its options and the caption files it needs all come from the checkpoint (ours, or the original
NRCCR release format). Results go to --results_dir (default <rootpath>/<collection>/results/<run>/...):
metrics.json (per fusion weight), report.txt (the paper-style tables), sims_<label>.npy ([captions, videos]
fused similarities), sims_primary.npy / sims_second.npy, caption_ids.txt and video_ids.txt.
"""
import argparse
import json
import logging
import os

import numpy as np

import evaluation
import model as models
from basic import paths
from basic.errors import DataError
from trainer import EvalData, autocast_factory, bool_flag
from util import checkpoint as ckpt
from util import data_provider as dp
from util import distributed as dist
from util import runs

logger = logging.getLogger('mlcmr')

# Above this many caption x video entries, --save_sims auto streams the metrics from the embeddings instead
# of building the [captions, videos] matrices (50M float32 entries = 200 MB per matrix).
SIMS_AUTO_LIMIT = 50_000_000


def get_args_parser():
    p = argparse.ArgumentParser('MLCMR tester', add_help=False)
    p.add_argument('--rootpath', default=os.path.join(os.path.expanduser('~'), 'VisualSearch'))
    p.add_argument('--collection', '--testCollection', dest='collection', default=None,
                   help='test collection (default: the one the model was trained on)')
    p.add_argument('--logger_name', default=None, help='run directory holding the checkpoint')
    p.add_argument('--checkpoint_name', default='model_best.pth.tar', help='file inside --logger_name')
    p.add_argument('--checkpoint', default=None, help='explicit checkpoint path (overrides --logger_name)')
    p.add_argument('--split', default='test', help='caption-file split (test)')
    p.add_argument('--visual_feature', default=None, help='default: the training feature')
    p.add_argument('--target_language', default=None, choices=['zh', 'en'],
                   help='MLCMR: query language (default: the training target)')
    p.add_argument('--train_mode', default=None, choices=['parallel', 'unparallel'],
                   help='MLCMR: selects the fusion weight (default: from the checkpoint)')
    p.add_argument('--label_situation', default=None, choices=['human_label', 'translate'],
                   help='MLCMR: selects the fusion weight (default: from the checkpoint)')
    p.add_argument('--data_type', default=None, help='NRCCR: default from the checkpoint (google_enc2zh)')
    p.add_argument('--bert_name', default=None,
                   help='tokenizer (and, for original release checkpoints, BERT config) source; default from the '
                        'checkpoint')
    p.add_argument('--eval_batch_size', type=int, default=None,
                   help='default NRCCR 64, MLCMR 16 (parity: padded pooling depends on batch composition)')
    p.add_argument('--results_dir', default=None)
    p.add_argument('--save_sims', default='auto', choices=['auto', '1', '0'],
                   help='save the [captions, videos] similarity matrices (.npy); auto: when at most '
                        f'{SIMS_AUTO_LIMIT:,} entries, else metrics are streamed from embeddings')
    p.add_argument('--device', default='auto')
    p.add_argument('--workers', type=int, default=5)
    p.add_argument('--amp', default='off', choices=['off', 'fp16', 'bf16'])
    p.add_argument('--strict', type=bool_flag, default=False)
    p.add_argument('--overwrite', type=int, default=0, help='1: evaluate again even if results exist')
    p.add_argument('--collectionStrt', default='single', choices=['single'])
    return p


def load_model(path, bert_name=None):
    """(model, train_args dict) from one of our checkpoints or an original NRCCR / MLCMR release checkpoint."""
    saved = ckpt.load_checkpoint(path)
    if saved.get('legacy'):
        kind = saved['legacy_model']
        convert = models.convert_legacy_mlcmr if kind == 'mlcmr' else models.convert_legacy_nrccr
        cfg, state = convert(saved, bert_name)
        train_args = dict(saved['opt'], model=kind)
    else:
        cfg, state, train_args = saved['model_cfg'], saved['model'], saved['args']
    model = models.build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f'{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected '
                        f'{unexpected[:3]}); is it an NRCCR/MLCMR checkpoint of this codebase?')
    return model, train_args


def results_dir_for(args, ckpt_path, target_language):
    run = os.path.normpath(os.path.dirname(os.path.abspath(ckpt_path))).split(os.sep)[-2:]
    stem = os.path.basename(ckpt_path).split('.')[0]
    suffix = f'_{target_language}' if target_language else ''
    return os.path.join(args.rootpath, args.collection, 'results', *run, f'{stem}_{args.split}{suffix}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()])
    args = parser.parse_args(argv)
    return runs.run_cli(_main, args)


def _main(args):
    if args.checkpoint is None:
        if args.logger_name is None:
            raise DataError('give --logger_name RUN_DIR or --checkpoint FILE')
        args.checkpoint = os.path.join(args.logger_name, args.checkpoint_name)
    device = dist.resolve_device(args.device)
    model, train_args = load_model(args.checkpoint, args.bert_name)
    model.to(device)
    is_mlcmr = train_args['model'] == 'mlcmr'

    # Options a model was trained with apply unless the command line says otherwise (docs/evaluation.md, 'Testers').
    opts = argparse.Namespace(**{k: train_args.get(k) for k in (
        'model', 'collection', 'visual_feature', 'data_type', 'train_mode', 'label_situation',
        'target_language', 'frame_sampling', 'bert_name', 'tokenizer_lower_case')})
    for key in ('collection', 'visual_feature', 'data_type', 'train_mode', 'label_situation', 'target_language',
                'bert_name'):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    opts.collection = opts.collection or train_args.get('trainCollection')
    if not opts.collection:
        raise DataError(f'{args.checkpoint}: the checkpoint does not name its collection; pass --collection')
    args.collection = opts.collection
    opts.rootpath, opts.strict = args.rootpath, args.strict
    opts.data_type = opts.data_type or 'google_enc2zh'
    opts.frame_sampling = opts.frame_sampling or 'first'
    opts.bert_name = opts.bert_name or 'bert-base-multilingual-cased'
    lower_case = True if opts.tokenizer_lower_case is None else opts.tokenizer_lower_case
    target = opts.target_language if is_mlcmr else None

    out_dir = args.results_dir or results_dir_for(args, args.checkpoint, target)
    metrics_path = os.path.join(out_dir, 'metrics.json')
    if os.path.exists(metrics_path) and not args.overwrite:
        print(f'results exist, skipping (pass --overwrite 1 to evaluate again): {metrics_path}')
        with open(metrics_path) as f:
            return {'results_dir': out_dir, 'metrics': json.load(f), 'skipped': True}
    os.makedirs(out_dir, exist_ok=True)
    runs.setup_logging(os.path.join(out_dir, 'test.log'))
    logger.info('checkpoint %s -> %s', args.checkpoint, out_dir)

    # ============ data ============
    tokenizer = dp.build_tokenizer(opts.bert_name, lower_case)
    store = dp.FrameStore(paths.feature_dir(args.rootpath, opts.collection, opts.visual_feature))
    if store.dim != model.cfg['visual_feat_dim']:
        raise DataError(f'{store.path}: features have {store.dim} dims but the checkpoint expects '
                        f'{model.cfg["visual_feat_dim"]}; pass the --visual_feature the model was trained with')
    data = EvalData(opts, args.split, tokenizer, store, purpose='test', target_language=target)
    batch_size = args.eval_batch_size or (16 if is_mlcmr else 64)

    # ============ encode, fuse, score ============
    autocast = autocast_factory(args.amp, device)
    videos = evaluation.encode_videos(model, data.video_set, batch_size, device, args.workers, autocast)
    texts = evaluation.encode_texts(model, data.text_set, batch_size, device, args.workers, autocast)
    entries = len(data.table) * len(data.videos)
    full = args.save_sims == '1' or (args.save_sims == 'auto' and entries <= SIMS_AUTO_LIMIT)
    if full:
        sims = {role: evaluation.similarity(emb, videos) for role, emb in texts.items()}
    else:
        logger.info('%d x %d gallery: metrics streamed from embeddings, similarity matrices not saved',
                    len(data.table), len(data.videos))
        texts = {role: evaluation.l2_normalize(emb) for role, emb in texts.items()}
        videos = evaluation.l2_normalize(videos)
    sweep = model.fusion_sweep(target_language=opts.target_language, train_mode=opts.train_mode,
                               label_situation=opts.label_situation)
    results, report = {}, []
    for label, w in sweep:
        if not full:
            t, v = evaluation.fusion_embeddings(texts['primary'], texts['second'], videos, w,
                                                model.fusion_normalize, device)
            metrics = evaluation.compute_metrics_from_embeddings(t, v, data.cap2vid, device=device)
        else:
            if model.fusion_normalize:
                fused = evaluation.fuse(sims['primary'], sims['second'], w)
            else:
                fused = w * sims['primary'] + (1 - w) * sims['second']
            metrics = evaluation.compute_metrics(fused, data.cap2vid)
            np.save(os.path.join(out_dir, f'sims_{label}.npy'), fused.numpy().astype(np.float32))
        results[label] = metrics
        report.append(evaluation.format_table(metrics, title=f'{opts.collection} {args.split} {label} '
                                              f'(weight {w:g} on {data.table.files["primary"]})'))
    if full:
        for role, s in sims.items():
            np.save(os.path.join(out_dir, f'sims_{role}.npy'), s.numpy().astype(np.float32))
    with open(os.path.join(out_dir, 'caption_ids.txt'), 'w') as f:
        f.write('\n'.join(data.table.cap_ids) + '\n')
    with open(os.path.join(out_dir, 'video_ids.txt'), 'w') as f:
        f.write('\n'.join(data.videos) + '\n')
    text = '\n\n'.join(report)
    with open(os.path.join(out_dir, 'report.txt'), 'w') as f:
        f.write(f'checkpoint: {args.checkpoint}\ncaptions: {", ".join(data.table.files.values())}\n\n{text}\n')
    with open(metrics_path + '.tmp', 'w') as f:
        json.dump(results, f, indent=2)
    os.replace(metrics_path + '.tmp', metrics_path)
    print(text)
    print(f'results written to {out_dir}')
    return {'results_dir': out_dir, 'metrics': results}


if __name__ == '__main__':
    main()
