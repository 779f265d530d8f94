"""Train NRCCR, MLCMR or mclip for cross-lingual text-to-video retrieval, then test the best checkpoint.

mclip is the multilingual CLIP model (nets/mclip.py).

    # one process, CPU or one GPU (the toy collection, see README)
    python trainer.py --model nrccr --rootpath ~/VisualSearch --collection vatex --visual_feature i3d_kinetics
    # several GPUs on one machine (DistributedDataParallel)
    torchrun --standalone --nproc_per_node=2 trainer.py --model nrccr ...

Re-running the same command continues an interrupted run from its last checkpoint, tests a finished run
whose test results are missing, and otherwise skips it (`--overwrite 1` trains again; the previous run is
kept aside until the new one's first checkpoint, docs/training.md, 'Overwriting a run'). Every epoch:
train one pass, validate, update the learning rate, checkpoint, write the history, check early stopping
(docs/training.md, 'Schedule').
"""
import argparse
import json
import logging
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch

import evaluation
import model as models
from basic import paths
from basic.errors import DataError
from basic import checkpoint as ckpt
from basic import compiling
from basic import data_provider as dp
from basic import distributed as dist
from basic import image_data
from basic import replacement
from basic import runs
from basic.precision import AMP_CHOICES, amp_log_level, autocast_factory, resolve_amp
from basic.progress import Progress
from basic.training import NonFiniteWatch, log_values, train_step

logger = logging.getLogger('mlcmr')

STATE_KEYS = ('epoch', 'global_step', 'best_score', 'lr', 'lr_counter', 'no_impr_counter')


def get_args_parser():
    p = argparse.ArgumentParser('MLCMR trainer', add_help=False)
    g = p.add_argument_group('Data')
    g.add_argument('--rootpath', default=os.path.join(os.path.expanduser('~'), 'VisualSearch'),
                   help='VisualSearch root holding <collection>/FeatureData and TextData (default ~/VisualSearch)')
    g.add_argument('--collection', default='vatex',
                   help='vatex, msrvttcn, toy (videos); multi30k, mscoco, toyimg (images) (default vatex)')
    g.add_argument('--visual_feature', default=None,
                   help='feature folder under FeatureData (default: vatex i3d_kinetics, msrvttcn '
                        'resnext101-resnet152, toy toy_feature; images: clip_vit_b32 or resnet_152 by --img_encoder, '
                        'toyimg toy_clip)')
    g.add_argument('--data_type', default=None,
                   help='NRCCR translation files <C>train_<data_type> (default: videos google_enc2zh; Multi-30K '
                        'and toyimg google_enc2de (or fr, cs), MSCOCO google_enc2ja (or zh))')
    g.add_argument('--model_type', default=None, choices=['video', 'img'],
                   help='video or image collection (default: img for multi30k, mscoco, toyimg, else video; '
                        'a renamed image collection needs img)')
    g.add_argument('--img_encoder', default=None, type=_img_encoder,
                   help='images: clip (CLIP ViT-B/32 embeddings, default) or resnet_152 (pooled ResNet-152 '
                        'features); picks the image encoder and the default --visual_feature')
    g.add_argument('--task', type=int, default=1, choices=[1, 2],
                   help='Multi-30K task 1 (default) or 2 (training on the Flickr30k task-2 captions)')
    g.add_argument('--clean_eval', default='raw', choices=['raw', 'en'],
                   help='images: tokenise the English MT of val/test raw (parity with the original image code) or '
                        'cleaned as the video variant does (en)')
    g.add_argument('--val_split', default='val',
                   help="caption files used for validation (default val; the MLCMR reference used 'test' on "
                        'MSR-VTT, which do_all_mlcmr.sh reproduces)')
    g.add_argument('--strict', type=runs.bool_flag, default=False,
                   help='0: skip captions whose partner caption is missing, with one warning; 1: error')
    g.add_argument('--frame_sampling', default='first', choices=['first', 'uniform'],
                   help='videos longer than 64 frames: keep the first 64 (parity) or 64 uniformly spaced')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='nrccr', choices=sorted(models.MODELS))
    g.add_argument('--bert_name', '--text_model', dest='bert_name', default=None,
                   help='hub id or local folder of the text encoder (NRCCR, MLCMR: a BERT, default '
                        'bert-base-multilingual-cased; mclip: a sentence-transformers folder, a CLIP model or any '
                        'transformers encoder, default sentence-transformers/clip-ViT-B-32-multilingual-v1)')
    g.add_argument('--tokenizer_lower_case', type=runs.bool_flag, default=True,
                   help='1 (parity): lower-case and strip accents even for the cased mBERT; 0: keep case')
    g.add_argument('--frozen', default=None, choices=['frozen', 'all_frozen', 'finetune'],
                   help="text encoder fine-tuning: 'frozen' trains only --layer_list (NRCCR, MLCMR default), "
                        "'all_frozen' none, 'finetune' all (mclip default)")
    g.add_argument('--layer_list', nargs='+', default=None,
                   help='BERT layers to fine-tune (NRCCR scripts: layer.5 ... layer.11; MLCMR: layer.6 ... layer.11)')
    g.add_argument('--text_mapping_layers', default='0-1536', help='text mapping, first entry replaced (0-1536)')
    g.add_argument('--visual_mapping_layers', default='0-1536', help='video mapping, first entry replaced (0-1536)')
    g.add_argument('--dropout', type=float, default=0.2, help='dropout of the mappings (0.2)')
    g.add_argument('--masked_pooling', type=runs.bool_flag, default=False,
                   help='0 (parity): mean-pool over padded positions too; 1: over valid positions only')

    g = p.add_argument_group('NRCCR')
    g.add_argument('--text_hidden_size', type=int, default=1024,
                   help='text transformer width (default 1024 as the reference argparse; scripts use 768)')
    g.add_argument('--video_hidden_size', type=int, default=1024, help='video transformer width (1024)')
    g.add_argument('--text_num_attention', type=int, default=8, help='text attention heads (8)')
    g.add_argument('--visual_num_attention', type=int, default=8, help='video attention heads (8)')
    g.add_argument('--video_layer', type=int, default=1, help='video attention layers (1)')
    g.add_argument('--attn_scale', default='value', choices=['value', 'key'],
                   help='attention scale 1/sqrt(H/h) (value, parity) or 1/sqrt(512/h) (key)')
    g.add_argument('--disc_type', default='weak', choices=['weak', 'not-so-weak', 'strong'],
                   help='language discriminator (default weak; scripts: vatex strong, msrvttcn not-so-weak)')
    g.add_argument('--disc_residual', default='relu', choices=['relu', 'input'],
                   help='strong discriminator residual on ReLU(x) (parity) or on x')
    g.add_argument('--glr', type=float, default=1e-3, help='discriminator Adam learning rate (1e-3)')
    g.add_argument('--scale', type=float, default=0.001, help='weight of the adversarial generator term (0.001)')
    g.add_argument('--tri_alpha', type=float, default=0.6, help='weight of Tri(c_tr, v) (0.6)')
    g.add_argument('--dtl_beta', type=float, default=0.4, help='weight of similarity-view distillation (0.4)')
    g.add_argument('--l1_gama', type=float, default=1.0, help='weight of feature-view distillation (1; scripts 0.1)')
    g.add_argument('--back_w', type=float, default=1.0, help='weight of back-translation loss (1; scripts 0.5)')
    g.add_argument('--dtl_detach_teacher', type=runs.bool_flag, default=False,
                   help='0 (parity): video gradients flow through the DTL teacher; 1: detach the whole teacher')
    g.add_argument('--feat_detach_teacher', type=runs.bool_flag, default=False,
                   help='0 (parity): both sides of the feature-view loss get gradient; 1: detach c_cross')
    g.add_argument('--sim_ratio', type=float, default=0.2, help='validation fusion weight on the English MT (0.2)')

    g = p.add_argument_group('MLCMR')
    g.add_argument('--train_mode', default='parallel', choices=['parallel', 'unparallel'])
    g.add_argument('--label_situation', default='translate', choices=['human_label', 'translate'],
                   help='parallel data: human captions in both languages, or source + machine translation')
    g.add_argument('--target_language', default='zh', choices=['zh', 'en'])
    g.add_argument('--visual_rnn_size', type=int, default=512, help='biGRU hidden size per direction (512)')
    g.add_argument('--visual_kernel_num', type=int, default=512, help='CNN kernels per size (512)')
    g.add_argument('--visual_kernel_sizes', default='2-3-4-5', help='CNN kernel sizes (2-3-4-5)')
    g.add_argument('--concate', default='full', choices=['full', 'reduced'],
                   help='video levels: full = [GRU | CNN | mean], reduced = [GRU | CNN]')
    g.add_argument('--packed_gru', type=runs.bool_flag, default=False,
                   help='0 (parity): GRU runs over the padding; 1: packed sequences')

    for cls in models.MODELS.values():          # flags only one model has (RetrievalModel.OWN_ARGS)
        if cls.OWN_ARGS:
            g = p.add_argument_group(cls.OWN_ARGS_TITLE)
            for flag, kwargs in cls.OWN_ARGS:
                g.add_argument(flag, **kwargs)

    g = p.add_argument_group('Loss')
    g.add_argument('--margin', type=float, default=0.2, help='triplet margin (0.2)')
    g.add_argument('--direction', default='all', choices=['all', 't2v', 'v2t'])
    g.add_argument('--cost_style', default='sum', choices=['sum', 'mean'])
    g.add_argument('--max_violation', action='store_true', help='hardest negatives (all scripts pass it)')
    g.add_argument('--dedup_negatives', type=runs.bool_flag, default=False,
                   help='0 (parity): other captions of the same video in a batch are negatives; 1: ignored')

    g = p.add_argument_group('Training')
    g.add_argument('--learning_rate', type=float, default=1e-4, help='Adam learning rate (1e-4)')
    g.add_argument('--lr_decay_rate', type=float, default=0.99, help='per-epoch decay (0.99)')
    g.add_argument('--grad_clip', type=float, default=2.0, help='max global grad norm (2)')
    g.add_argument('--num_epochs', type=int, default=50,
                   help='maximum epochs (50); 0 saves and tests the untrained model (a baseline)')
    g.add_argument('--batch_size', type=int, default=None, help='per process (NRCCR 128, MLCMR 64)')
    g.add_argument('--eval_batch_size', type=int, default=None,
                   help='validation and test batch (default: validation the training batch, as the originals; test '
                        'NRCCR 64, MLCMR 16; it changes padded pooling, keep it for parity)')
    g.add_argument('--early_stop', type=int, default=10,
                   help='stop after more than this many epochs without improvement (10)')
    g.add_argument('--workers', type=int, default=5, help='data-loading processes (5)')
    g.add_argument('--amp', default='off', choices=AMP_CHOICES,
                   help="mixed precision (docs/training.md, 'Mixed precision'): off = fp32 (default, the papers' "
                        'numbers); bf16 where the device has it natively (Ampere+ GPUs, CPUs with AVX512-BF16 or '
                        'AMX), else an error; auto = bf16 where native, fp32 elsewhere; fp16 with loss scaling')
    g.add_argument('--compile', type=compiling.parse_compile, default='auto',
                   help="torch.compile the training forward (docs/training.md, 'Compilation'): auto (default) = on a "
                        'CUDA GPU with triton for runs of 2000+ steps, eager on a CPU (measured not to pay there); '
                        '1 = wherever a compiler is found; 0 = eager')
    g.add_argument('--sync_bn', type=runs.bool_flag, default=True,
                   help='under DDP on GPUs, BatchNorm statistics over the global batch (1); CPU: per rank')
    g.add_argument('--max_steps_per_epoch', type=int, default=0, help='cap steps per epoch, 0 = all (for tests)')

    g = p.add_argument_group('Run')
    g.add_argument('--cv_name', default=None, help='run-folder component (NRCCR MM_2022, MLCMR mlcmr)')
    g.add_argument('--postfix', default='runs_0', help='last run-folder component (runs_0)')
    g.add_argument('--overwrite', type=int, default=0,
                   help='1: train again even if the run finished (the previous run is deleted only once the new '
                        'one saved its first checkpoint)')
    g.add_argument('--resume', default='',
                   help="checkpoint to resume from; by default an unfinished run resumes from its checkpoint_last")
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--seed', type=int, default=0, help='random seed (0); CPU runs are repeatable')
    g.add_argument('--log_step', type=int, default=10, help='TensorBoard scalars every N steps (10)')
    g.add_argument('--log_every', type=int, default=50,
                   help='when stderr is not a terminal (nohup, sbatch, CI): a progress line every N steps or 60 s, '
                        'whichever comes first (50); on a terminal a progress bar')
    g.add_argument('--skip_test', type=runs.bool_flag, default=False, help='1: do not test after training')

    g = p.add_argument_group('Compatibility (accepted, no effect)',
                             "the original scripts pass these; they change nothing and are not part of the run's "
                             'configuration hash')
    g.add_argument('--collectionStrt', default='single', choices=['single'], help='collection structure')
    g.add_argument('--img_encoder_name', default=None,
                   help='CLIP model of the original image scripts; features are extracted once by '
                        'util/extract_image_features.py --model instead')
    g.add_argument('--img_encoder_input_dim', type=int, default=None,
                   help='read from the features (512 for CLIP ViT-B/32)')
    g.add_argument('--img_path', default=None,
                   help='JPEG folder of the original image scripts; extract its features once with '
                        'util/extract_image_features.py --images IMG_PATH')
    g.add_argument('--text_layer', type=int, default=1, help='unused in the reference')
    g.add_argument('--text_pooling', default='mean', choices=['mean'], help='text pooling is the mean')
    g.add_argument('--video_pooling', default='mean', choices=['mean'], help='video pooling is the mean')
    g.add_argument('--gru_pool', default='mean', choices=['mean'], help='GRU pooling is the mean')
    g.add_argument('--momentum', type=float, default=None, help='Adam is used, as in the reference')
    g.add_argument('--optim', default='adam', choices=['adam'], help='Adam')
    g.add_argument('--measure', default='cosine', choices=['cosine'], help='cosine similarity')
    g.add_argument('--text_norm', action='store_true', help='embeddings are always l2-normalised')
    g.add_argument('--visual_norm', action='store_true', help='embeddings are always l2-normalised')
    g.add_argument('--val_metric', default='recall', choices=['recall'], help='validation uses recalls')
    return p


# ============ configuration ============

def _img_encoder(value):
    try:
        return image_data.img_encoder_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_visual_args(args):
    """Video or image run, image encoder and feature folder, from the flags and the collection's name."""
    if args.model_type is None:
        args.model_type = 'img' if image_data.is_image_collection(args.collection) else 'video'
    if args.model_type == 'img':
        args.img_encoder = args.img_encoder or 'clip'
        args.visual_feature = args.visual_feature or image_data.default_feature(args.collection, args.img_encoder)
        args.data_type = args.data_type or image_data.default_data_type(args.rootpath, args.collection)
    else:
        args.data_type = args.data_type or 'google_enc2zh'
        args.img_encoder = None
        args.visual_feature = args.visual_feature or paths.PRESETS.get(args.collection, {}).get('feature',
                                                                                              'i3d_kinetics')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()])
    return finalize_args(parser.parse_args(argv))


def finalize_args(args):
    """Validate and derive model-dependent defaults in one place (derived values get their own names)."""
    cls = models.MODELS[args.model]
    defaults = cls.RUN_DEFAULTS
    resolve_visual_args(args)
    drop_other_models_args(args)
    args.run_name_flags = list(cls.RUN_NAME_FLAGS)
    args.cv_name = args.cv_name or defaults['cv_name']
    args.batch_size = args.batch_size or defaults['batch_size']
    # both originals build their validation loaders with the training batch size (docs/training.md, 'Validation score')
    args.val_batch_size = args.eval_batch_size or args.batch_size
    args.bert_name = args.bert_name or defaults['bert_name']
    args.frozen = args.frozen or defaults['frozen']
    if args.layer_list is None:
        args.layer_list = list(cls.DEFAULTS['trainable_layers'] or [])
    dims = []
    for flag in ('text_mapping_layers', 'visual_mapping_layers'):
        try:
            dims.append(int(getattr(args, flag).split('-')[-1]))
        except ValueError:
            raise SystemExit(f'--{flag} {getattr(args, flag)}: expected e.g. 0-1536') from None
    if dims[0] != dims[1]:
        raise SystemExit(f'--text_mapping_layers and --visual_mapping_layers must end in the same (joint space) '
                         f'size, got {dims[0]} and {dims[1]}')
    return args


def drop_other_models_args(args):
    """Flags only another model has (RetrievalModel.OWN_ARGS) leave the namespace, so they are in no other
    model's run (its run-folder hash stays what it was); one set away from its default is an error."""
    for cls in models.MODELS.values():
        if cls.name == args.model:
            continue
        for flag, kwargs in cls.OWN_ARGS:
            dest = flag.lstrip('-')
            if getattr(args, dest) != kwargs.get('default'):
                raise SystemExit(f'error: {flag} is a flag of --model {cls.name}, not of --model {args.model}')
            delattr(args, dest)


def data_cfg_from_args(args):
    """The plain data config (basic/data_provider.py DATA_DEFAULTS) the data side is built from; stored in
    every checkpoint beside model_cfg. Its `model` names the caption scheme the model reads (CAPTIONS)."""
    cfg = dp.data_config(**{k: getattr(args, k) for k in dp.DATA_DEFAULTS})
    cfg['model'] = models.MODELS[args.model].CAPTIONS
    return cfg


def model_cfg_from_args(args, store):
    """The plain config dict the model is built from (stored in every checkpoint): the model class maps the
    flags (and the training features' store) to it."""
    return models.MODELS[args.model].config_from_args(args, store)


def check_inputs(args):
    """The collection and its feature and caption folders exist (for an image collection also: the target
    language, every caption file, each split's id file and features), and what the model needs (its class's
    check_inputs): checked before any run folder is made, so a typo leaves nothing behind."""
    collection = paths.collection_dir(args.rootpath, args.collection)
    if not os.path.isdir(collection):
        raise DataError(f'{collection}: no such collection folder; check --rootpath and --collection (a collection '
                        'is a folder holding FeatureData/ and TextData/)')
    if args.model_type == 'img' and not models.MODELS[args.model].IMAGES:
        raise DataError(f'{collection}: image collections are trained with NRCCR only; pass --model nrccr')
    features = paths.feature_dir(args.rootpath, args.collection, args.visual_feature)
    if not os.path.isdir(features):
        have = sorted(os.listdir(os.path.dirname(features))) if os.path.isdir(os.path.dirname(features)) else []
        raise DataError(f'{features}: no such feature folder; check --visual_feature (found: '
                        f'{", ".join(have) or "none"})' + ('; CLIP features are made once by '
                        'util/extract_image_features.py' if args.model_type == 'img' else ''))
    text = paths.text_dir(args.rootpath, args.collection)
    if not os.path.isdir(text):
        raise DataError(f'{text}: no caption folder; put the caption files of {args.collection} there')
    if args.model_type == 'img':
        splits = ('train', args.val_split) + (() if args.skip_test else ('test',))
        image_data.check_image_collection(args.rootpath, data_cfg_from_args(args), splits)
    models.MODELS[args.model].check_inputs(args)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ============ run folder ============

def find_run(args, info):
    """The run's paths and state, read before anything is written: console logging starts (the log file
    follows in open_run_dir), a replacement a kill interrupted is finished or undone first
    (docs/training.md, 'Overwriting a run'), and `finished` says whether val_metric.txt is there."""
    directory = runs.run_dir(args)
    runs.setup_logging(None, dist.is_main())
    run = SimpleNamespace(directory=directory, device=info.device, world=info.world_size, rank=info.rank,
                          main_process=dist.is_main(), finished_flag=os.path.join(directory, 'val_metric.txt'),
                          last_path=os.path.join(directory, 'checkpoint_last.pth.tar'),
                          best_path=os.path.join(directory, 'model_best.pth.tar'),
                          replacement=replacement.Replacement(directory, runs.is_run_file, runs.run_committed,
                                                              aside='.previous_run', what='run'))
    if run.main_process:
        recovered = run.replacement.recover()
        if recovered:
            logger.warning('%s: %s', directory, recovered)
    dist.barrier()
    run.finished = os.path.exists(run.finished_flag)
    return run


def open_run_dir(args, run):
    """Create the run folder (with --overwrite 1 the previous run's files were just set aside), remove the
    temporary files a killed save left, open train.log (the records logged so far go in first) and write the
    run's identity."""
    if run.main_process:
        os.makedirs(run.directory, exist_ok=True)
        removed = ckpt.remove_stale_temp_files(run.directory)
        if removed:
            logger.info('removed temporary files of an interrupted save: %s',
                        ', '.join(os.path.basename(p) for p in removed))
        runs.attach_log_file(os.path.join(run.directory, 'train.log'))
        runs.write_identity(run.directory, args, {'world_size': run.world, 'device': str(run.device)})
    dist.barrier()
    logger.info('run dir: %s', run.directory)
    logger.info('args: %s', json.dumps(vars(args), sort_keys=True, default=str))


def resolve_precision(args, device):
    """Resolve --amp once for this device (basic/precision.py): stores the precision the run computes in as
    args.amp_resolved (off, fp16 or bf16; in args.json and every checkpoint; outside the run-folder hash,
    which keeps --amp as given) and returns (logging level, line) for the run's log. An explicit bf16 on a
    device without native bf16 is a DataError (one line); auto falling back to fp32 is a warning."""
    args.amp_resolved, message = resolve_amp(args.amp, device)
    return amp_log_level(args.amp, args.amp_resolved), message


def seed_and_backends(args, run):
    seed_everything(args.seed)          # identical initial weights on every rank
    if run.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ============ data, model ============

def build_data(args, data_cfg, run):
    """Tokenizer, visual stores (video: one for all splits; images: one per split), training set and loader,
    validation data."""
    cls = models.MODELS[args.model]
    tokenizer = cls.build_tokenizer(data_cfg)
    stores = dp.open_stores(args.rootpath, data_cfg, ('train', data_cfg['val_split']))
    store, val_store = stores['train'], stores[data_cfg['val_split']]
    if val_store.dim != store.dim:
        raise DataError(f'{val_store.path}: {val_store.dim}-d features but the training features {store.path} '
                        f'have {store.dim}; both splits must come from the same extractor')
    table = dp.train_table(args.rootpath, data_cfg, tokenizer)
    train_set = dp.TrainDataset(table, store, augment=cls.AUGMENT, mask_id=tokenizer.mask_token_id,
                                frame_sampling=data_cfg['frame_sampling'], seed=args.seed)
    val = dp.EvalData(args.rootpath, data_cfg, data_cfg['val_split'], tokenizer, val_store, purpose='val')
    sampler = None
    if run.world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=args.seed)
    loader = dp.make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                            sampler=sampler, pin_memory=run.device.type == 'cuda')
    kind = 'images' if dp.is_image(data_cfg) else 'videos'
    logger.info('train: %d captions of %d %s (%s); val: %d captions, %d %s', len(train_set), len(table.videos),
                kind, ', '.join(table.files.values()), len(val.table), len(val.videos), kind)
    return SimpleNamespace(cfg=data_cfg, store=store, train_set=train_set, sampler=sampler, loader=loader, val=val)


def build_model(args, model_cfg, run):
    """The model, its DDP wrapper, optimisers, gradient scaler and autocast factory."""
    model = models.build_model(model_cfg).to(run.device)
    optimizers = model.configure_optimizers(args.learning_rate, args.glr)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info('model %s: %.1fM parameters, %.1fM trainable', args.model,
                sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6)
    ddp_model = model
    if run.world > 1:
        if args.sync_bn and run.device.type == 'cuda':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:   # SyncBatchNorm needs CUDA: statistics stay per rank, running stats come from rank 0
            logger.info('BatchNorm statistics per rank (SyncBatchNorm needs CUDA); running stats from rank 0')
        ignore = [n for n, _ in model.named_parameters() if n.startswith('discriminator.')]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == 'cuda' else None)
        model.set_distributed(dist.all_gather_with_grad, dist.all_reduce_mean_, run.world)
    return SimpleNamespace(cfg=model_cfg, model=model, ddp_model=ddp_model, optimizers=optimizers,
                           scaler=torch.amp.GradScaler(run.device.type, enabled=args.amp_resolved == 'fp16'),
                           autocast=autocast_factory(args.amp_resolved, run.device))


def compile_training_forward(args, run, net, epoch_steps):
    """--compile (basic/compiling.py): the training forward compiled or eager, said in one log line. Only
    the training forward is compiled; validation and the tester encode eagerly."""
    on, message, level = compiling.resolve_compile(args.compile, run.device, epoch_steps * args.num_epochs)
    logger.log(level, '%s', message)
    if on:
        net.ddp_model = compiling.compile_forward(net.ddp_model)


# ============ resume, checkpoint ============

def resume(args, run, net):
    """The training state: fresh, or restored from --resume / the run's checkpoint_last (weights, optimisers,
    scaler, RNG states, schedule, history); read before the run folder is written, so a checkpoint that
    cannot be read, or does not fit the model, stops the run with the folder untouched. train_loop then
    rewrites the history files from the state, so a kill at any moment leaves them exactly as an
    uninterrupted run's."""
    state = {'epoch': 0, 'global_step': 0, 'best_score': 0.0, 'lr': args.learning_rate, 'lr_counter': 0,
             'no_impr_counter': 0, 'history': [], 'resumed_from': None}
    path = args.resume or (run.last_path if os.path.exists(run.last_path) and not args.overwrite else '')
    if path:
        saved = ckpt.load_checkpoint(path)
        try:
            net.model.load_state_dict(saved['model'])
            for name, opt in net.optimizers.items():
                opt.load_state_dict(saved['optimizers'][name])
            net.scaler.load_state_dict(saved['scaler'])
        except (KeyError, RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DataError(f'{path}: does not fit this run\'s model ({reason}); resume from a checkpoint this '
                            'trainer wrote with the same configuration') from None
        for key in STATE_KEYS:
            state[key] = saved[key]
        # checkpoints written before the history was stored in them: take it from metrics.jsonl
        state['history'] = list(saved['history']) if 'history' in saved else runs.read_history(
            run.directory, state['epoch'])
        state['resumed_from'] = path
        before = saved['args'].get('amp_resolved', saved['args'].get('amp'))
        if before != args.amp_resolved:       # e.g. --amp auto resumed on other hardware
            logger.warning('%s was trained with --amp %s; it continues with %s', path, before, args.amp_resolved)
        ckpt.restore_rng_state(saved['rng'][run.rank] if run.rank < len(saved['rng']) else saved['rng'][0])
        logger.info('resumed from %s at epoch %d (lr %.3g, best %.2f)', path, state['epoch'], state['lr'],
                    state['best_score'])
    set_lr(net.optimizers['main'], state['lr'])
    return state


def checkpoint_dict(args, data_cfg, net, state):
    """Everything a resume needs, tensors and plain types only (collective: gathers every rank's RNG)."""
    return {'format_version': ckpt.FORMAT_VERSION, 'model_name': args.model, 'model_cfg': net.cfg,
            'data_cfg': data_cfg, 'model': ckpt.strip_module_prefix(net.model.state_dict()),
            'optimizers': {k: o.state_dict() for k, o in net.optimizers.items()},
            'scaler': net.scaler.state_dict(), 'args': dict(vars(args)),
            'rng': dist.all_gather_object(ckpt.capture_rng_state()),
            'history': list(state['history']), **{k: state[k] for k in STATE_KEYS}}


# ============ training ============

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def embed_split(model, data, batch_size, device, workers, autocast, distributed):
    """{'primary': sims, 'second': sims}: [captions, videos] float64 similarity matrices on CPU. With masked
    pooling captions are encoded in length buckets (less padding, same embeddings); with parity pooling in
    the original file-order batches, whose composition the padded mean depends on (basic/bucketing.py)."""
    texts, videos = evaluation.encode_split(model, data, batch_size, device, workers, autocast,
                                            dist if distributed else None)
    return {role: evaluation.similarity(emb, videos) for role, emb in texts.items()}


def steps_per_epoch(args, loader):
    """Training steps of one epoch: the loader's batches, capped by --max_steps_per_epoch."""
    return len(loader) if not args.max_steps_per_epoch else min(len(loader), args.max_steps_per_epoch)


def train_one_epoch(args, run, net, loader, state, writer):
    """One pass over the training data (basic/training.py train_step per batch); returns the epoch's mean logs
    and samples/s (all ranks).

    Progress: a bar on a terminal, otherwise a log line every --log_every steps or 60 s (basic/progress.py).
    The step's logs stay on the device as 0-d tensors, summed there; they are read every --log_step steps
    (TensorBoard) and at the end of the epoch, so a GPU never waits for the host in between. The non-finite
    loss check runs every step on a CPU (free there, and before the weights change); on a GPU it is read at
    the same rhythm and names the first bad step (basic/training.py NonFiniteWatch)."""
    main_params = net.model.main_parameters()
    net.model.train()
    epoch = state['epoch']
    check_every_step = run.device.type == 'cpu'
    watch = None if check_every_step else NonFiniteWatch(run.device)
    sums, count, samples, t0 = {}, 0, 0, time.time()
    total = steps_per_epoch(args, loader)
    with Progress(total, f'epoch {epoch}', unit='samples', every_steps=args.log_every,
                  enabled=run.main_process) as progress:
        for step, batch in enumerate(loader):
            if step >= total:
                break
            batch = dp.move_to(batch, run.device)
            try:
                logs = train_step(net.model, net.ddp_model, batch, net.optimizers, net.scaler, net.autocast,
                                  args.grad_clip, main_params, check_finite=check_every_step)
            except FloatingPointError as e:
                raise FloatingPointError(f'epoch {epoch} step {step}: {e}') from None
            if watch is not None:
                watch.update(step, logs['loss'])
            state['global_step'] += 1
            size = batch['index'].shape[0]
            samples += size
            count += 1
            for k, v in logs.items():
                v = v.double()      # summed in float64, as python floats would be
                sums[k] = sums[k] + v if k in sums else v
            progress.update(samples=size * run.world, loss=logs['loss'])
            if state['global_step'] % args.log_step == 0:
                if watch is not None:
                    watch.check(f'epoch {epoch}')
                if writer.enabled:
                    writer.scalars(dict(log_values(logs), lr=net.optimizers['main'].param_groups[0]['lr']),
                                   state['global_step'], 'train/')
    if watch is not None:
        watch.check(f'epoch {epoch}')
    means = {k: v / max(count, 1) for k, v in log_values(sums).items()}
    elapsed = max(time.time() - t0, 1e-9)
    return means, samples * run.world / elapsed


def validate(args, run, data, net):
    sims = embed_split(net.model, data.val, args.val_batch_size, run.device, args.workers, net.autocast,
                       run.world > 1)
    return net.model.validation_score(sims, data.val.cap2vid)


def update_schedule(args, state, score, optimizer):
    """Early-stopping counter and learning rate after an epoch (docs/training.md, 'Schedule'): decay every
    epoch, halve after a non-improving epoch once more than 2 epochs passed since the last halving."""
    improved = score > state['best_score']
    state['no_impr_counter'] = 0 if improved else state['no_impr_counter'] + 1
    if improved:
        state['best_score'] = score
    state['lr'] *= args.lr_decay_rate
    state['lr_counter'] += 1
    if not improved and state['lr_counter'] > 2:
        state['lr'] *= 0.5
        state['lr_counter'] = 0
    set_lr(optimizer, state['lr'])
    return improved


def training_done(args, state):
    """All epochs run, or early stopping (more than --early_stop epochs without improvement); read from the
    state alone, so a resumed run that had stopped early stays stopped."""
    return state['epoch'] >= args.num_epochs or (state['epoch'] > 0 and state['no_impr_counter'] > args.early_stop)


def run_epoch(args, run, data, net, state, writer):
    """Train, validate, schedule; then checkpoint (best, last) and rewrite the history from the state."""
    epoch = state['epoch']
    data.train_set.set_epoch(epoch)
    data.loader.generator.manual_seed(args.seed * 100003 + epoch)   # shuffling depends on (seed, epoch) only,
    if data.sampler is not None:                                    # so a resumed run sees the same order
        data.sampler.set_epoch(epoch)
    t0 = time.time()
    train_logs, samples_per_s = train_one_epoch(args, run, net, data.loader, state, writer)
    dist.broadcast_buffers_(net.model)      # every rank evaluates with rank 0's BatchNorm statistics
    score, val_logs = validate(args, run, data, net)
    improved = update_schedule(args, state, score, net.optimizers['main'])
    state['epoch'] = epoch + 1
    record = dict(epoch=epoch, score=score, best=state['best_score'], improved=improved, lr=state['lr'],
                  samples_per_s=samples_per_s, seconds=time.time() - t0,
                  **{f'train/{k}': v for k, v in train_logs.items()}, **val_logs)
    state['history'].append(record)
    saved = checkpoint_dict(args, data.cfg, net, state)        # collective (RNG states of every rank)
    if run.main_process:
        if improved:
            ckpt.save_checkpoint(saved, run.best_path)
        ckpt.save_checkpoint(saved, run.last_path)     # marks the epoch done; its history is inside
        run.replacement.commit()                       # --overwrite 1: the new run can resume now
        writer.history(state['history'])
    writer.scalars(dict(val_logs, val_score=score), state['global_step'])
    logger.info('epoch %d: loss %.4f | val score %.2f (best %.2f%s) | lr %.3g | %.0f samples/s | %.0fs',
                epoch, train_logs.get('loss', float('nan')), score, state['best_score'],
                ', improved' if improved else '', state['lr'], samples_per_s, time.time() - t0)


def train_loop(args, run, data, net, state):
    writer = runs.MetricsWriter(run.directory, enabled=run.main_process, purge_step=state['global_step'])
    writer.history(state['history'])        # as the checkpoint resumed from holds it (empty for a new run)
    try:
        if args.num_epochs == 0 and state['resumed_from'] is None:
            # An untrained baseline: the initial weights become the "best" checkpoint, so the test step
            # reports what training adds.
            state['best_score'], _ = validate(args, run, data, net)
            saved = checkpoint_dict(args, data.cfg, net, state)
            if run.main_process:
                ckpt.save_checkpoint(saved, run.best_path)
            logger.info('--num_epochs 0: saved the untrained model (val score %.2f)', state['best_score'])
        while not training_done(args, state):
            run_epoch(args, run, data, net, state, writer)
        if state['epoch'] < args.num_epochs:
            logger.info('early stop: %d epochs without improvement', state['no_impr_counter'])
    except KeyboardInterrupt:
        logger.warning('interrupted at epoch %d; run the same command again to resume from %s',
                       state['epoch'], run.last_path)
        raise
    finally:
        writer.close()


# ============ finish, test ============

def finish(run, state):
    """Mark the training finished (val_metric.txt); the test that follows is not part of the mark."""
    if run.main_process:
        runs.atomic_write_text(run.finished_flag, f'best performance on validation: {state["best_score"]}\n')
        run.replacement.commit()        # --num_epochs 0 (a baseline) saves no checkpoint_last
    logger.info('training finished: best validation score %.2f, checkpoint %s', state['best_score'], run.best_path)
    dist.barrier()
    return {'run_dir': run.directory, 'best_score': state['best_score'], 'epochs': state['epoch']}


def tester_argv(args, run, overwrite):
    """The tester's command line for this run: its checkpoint and its evaluation settings."""
    argv = ['--rootpath', args.rootpath, '--collection', args.collection, '--logger_name', run.directory,
            '--device', str(run.device), '--workers', str(args.workers), '--overwrite', '1' if overwrite else '0',
            '--amp', args.amp_resolved, '--strict', str(int(args.strict)), '--bert_name', args.bert_name]
    if args.eval_batch_size:
        argv += ['--eval_batch_size', str(args.eval_batch_size)]
    return argv


def test_after_training(args, run, overwrite):
    """Test the best checkpoint (main process). overwrite=False: only when its results are missing."""
    if not run.main_process:
        return None
    import tester
    return tester.main(tester_argv(args, run, overwrite))


def rerun_finished(args, run):
    """The same command on a finished run: test it when its test results are missing, else nothing."""
    if run.main_process:
        runs.attach_log_file(os.path.join(run.directory, 'train.log'))
    logger.info('run already finished: %s (same configuration); pass --overwrite 1 to train again', run.directory)
    result = {'run_dir': run.directory, 'skipped': True}
    if not args.skip_test:
        result['test'] = test_after_training(args, run, overwrite=False)
    return result


# ============ main ============

def main(argv=None):
    result = runs.run_cli(_main, parse_args(argv))
    dist.cleanup()      # once _main has returned: its DDP wrapper no longer holds the process group
    return result


def _main(args):
    check_inputs(args)                          # before any folder is made
    info = dist.init_distributed(args.device)
    level, precision_note = resolve_precision(args, info.device)   # --amp bf16 without native bf16 stops here
    run = find_run(args, info)
    logger.log(level, '%s', precision_note)
    if run.finished and not args.overwrite:
        return rerun_finished(args, run)
    seed_and_backends(args, run)
    # every input is read here (caption files, features, video2frames, BERT, the checkpoint to resume),
    # before anything in the run folder is written or moved
    data = build_data(args, data_cfg_from_args(args), run)
    net = build_model(args, model_cfg_from_args(args, data.store), run)
    compile_training_forward(args, run, net, steps_per_epoch(args, data.loader))
    seed_everything(args.seed + run.rank)
    state = resume(args, run, net)
    # --overwrite 1: the previous run waits aside until the new one's first checkpoint, and comes back if
    # the new one stops before (docs/training.md, 'Overwriting a run')
    with run.replacement.attempt(replace=run.main_process and bool(args.overwrite)):
        open_run_dir(args, run)
        train_loop(args, run, data, net, state)
        result = finish(run, state)
    if not args.skip_test:
        result['test'] = test_after_training(args, run, overwrite=True)
    return result


if __name__ == '__main__':
    main()
