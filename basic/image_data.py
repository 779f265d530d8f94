"""Image collections (Multi-30K, MSCOCO, the toy `toyimg`) for NRCCR: feature stores and caption streams.

An image is a one-frame video: `ImageStore` has the interface of `basic.data_provider.FrameStore` (`dim`,
`path`, `check_videos(ids, source)`, `frames(id) -> (1, D) float32`), so the video datasets, collate and
models serve images unchanged. Two feature layouts are read (docs/data.md, 'Image collections'):

  * the released one: per split an id list (`FeatureData/train_id.txt`, ...) and a `.npy` array whose row i is
    image i of the list (`FeatureData/<feature>/train-<feature>-avgpool.npy`, ...), memory-mapped;
  * a BigFile with one row per image (`FeatureData/<feature>/{feature.bin,id.txt,shape.txt}`, the VisualSearch
    format), as written by `util/extract_image_features.py` and `util/txt2bin.py`. The split id lists are then
    optional: when present they must name images of the BigFile.

The functions take the root folder and the run's data config (basic/data_provider.py DATA_DEFAULTS); the keys
they read besides collection, visual_feature and strict:

    model_type    'img' for an image collection (the data layer dispatches on it)
    data_type     '<provider>_enc2<xx>', e.g. google_enc2de (xx = target language)
    task          Multi-30K task 1 or 2 (MSCOCO and the toy collection: 1)
    img_encoder   'clip' or 'resnet_152' (which encoder, hence which default feature folder)
    clean_eval    'raw' (the original image code) or 'en' (clean the English MT, as the video variant does)

The data layer (basic/data_provider.py `open_store`, `train_table`, `eval_table`) calls the store and stream
functions; this module does not import it.
"""
import logging
import os

import numpy as np

from basic import paths
from basic.bigfile import BigFile
from basic.errors import DataError

logger = logging.getLogger(__name__)

_SHOW = 5
# --img_encoder -> (the model's visual_encoder, the default feature folder) (docs/models.md, 'Image encoders')
IMG_ENCODERS = {'clip': ('clip', 'clip_vit_b32'), 'resnet_152': ('resnet', 'resnet_152')}


def _first(items):
    return ', '.join(items[:_SHOW]) + (', ...' if len(items) > _SHOW else '')


def img_encoder_name(name):
    """'clip' or 'resnet_152' from the spellings the original accepted ('clip', 'resnet_152', 'resnet152')."""
    name = str(name or 'clip').lower()
    if 'clip' in name:
        return 'clip'
    if name.replace('_', '').replace('-', '') == 'resnet152':
        return 'resnet_152'
    raise ValueError(f'img_encoder must be clip or resnet_152, got {name!r}')


def visual_encoder(img_encoder):
    """The model's visual_encoder ('clip' | 'resnet') for an --img_encoder value."""
    return IMG_ENCODERS[img_encoder_name(img_encoder)][0]


def default_feature(collection, img_encoder):
    """The feature folder an image run reads when --visual_feature is not given: the collection preset's CLIP
    feature (toyimg: toy_clip) for CLIP, `resnet_152` for ResNet-152."""
    kind = img_encoder_name(img_encoder)
    if kind == 'clip':
        return paths.IMAGE_PRESETS.get(collection, {}).get('feature', IMG_ENCODERS['clip'][1])
    return IMG_ENCODERS[kind][1]


def default_data_type(rootpath, collection):
    """The data_type an image run reads when --data_type is not given: google_enc2<xx> with xx = de for
    Multi-30K and the toy collection, ja for MSCOCO (the original scripts' defaults), else the collection's
    first language."""
    preferred = {'multi30k': 'de', 'toyimg': 'de', 'mscoco': 'ja'}.get(collection)
    languages = image_languages(rootpath, collection)
    return f'google_enc2{preferred or (languages[0] if languages else "de")}'


def is_image_collection(collection):
    """True for the image collections this code knows by name (a renamed copy needs `--model_type img`)."""
    return collection in paths.IMAGE_PRESETS


# ============ id lists and feature stores ============

def read_image_ids(path):
    """Image ids of an id file, one per line, in order (row i of the split's features). A final newline,
    CRLF and surrounding spaces are tolerated; a blank line inside the file is an error (rows would shift)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f'{path}: image id file missing; it comes with the feature archive of the collection '
                        '(one image id per line), check --rootpath, --collection and --visual_feature') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read image id file ({e.strerror})') from None
    try:
        lines = data.decode('utf-8').split('\n')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: invalid UTF-8 at byte {e.start}; re-save the id file as UTF-8') from None
    while lines and not lines[-1].strip():
        lines.pop()
    ids = [line.strip() for line in lines]
    for line_no, image_id in enumerate(ids, start=1):
        if not image_id or len(image_id.split()) != 1:
            raise DataError(f'{path}:{line_no}: expected one image id per line, got {lines[line_no - 1][:80]!r}; '
                            'remove the line (row i of the features belongs to line i)')
    return ids


class ImageStore:
    """One feature row per image, served as a one-frame video (the FrameStore interface).

    `ids` lists the images of the store in order (the split's id file, or every row of a BigFile)."""

    def __init__(self, ids, rows, data, path):
        self.ids = list(ids)
        self._row = dict(zip(self.ids, rows))
        self._data = data                      # (N, D) array-like: np.memmap, ndarray or BigFile.data
        self.dim = int(data.shape[1])
        self.path = path

    @classmethod
    def from_npy(cls, id_file, npy_file):
        """The released layout: line i of `id_file` names row i of `npy_file` (memory-mapped)."""
        ids = read_image_ids(id_file)
        data = load_feature_array(npy_file)
        if len(ids) != data.shape[0]:
            raise DataError(f'{npy_file}: {data.shape[0]} feature rows but {id_file} lists {len(ids)} image ids; '
                            'they must belong together (row i = line i): re-download or re-extract one of them')
        first = {}
        dups = [i for n, i in enumerate(ids) if first.setdefault(i, n) != n]
        if dups:
            logger.warning('%s: %d repeated image ids (first: %s); the first row of each is used',
                           id_file, len(dups), _first(list(dict.fromkeys(dups))))
        return cls(list(first), list(first.values()), data, npy_file)

    @classmethod
    def from_bigfile(cls, feature_dir, id_file=None):
        """A BigFile with one row per image; `id_file` (optional) restricts and orders the store's ids."""
        big = BigFile(feature_dir)
        if id_file is None:
            ids = big.names
        else:
            ids = list(dict.fromkeys(read_image_ids(id_file)))
            missing = [i for i in ids if i not in big]
            if missing:
                raise DataError(f'{id_file}: {len(missing)} of {len(ids)} image ids have no row in {feature_dir} '
                                f'(first: {_first(missing)}); extract them with util/extract_image_features.py '
                                '(it resumes) or check --visual_feature')
        return cls(ids, [big.name2index[i] for i in ids], big.data, feature_dir)

    def __len__(self):
        return len(self.ids)

    def __contains__(self, image_id):
        return image_id in self._row

    def check_videos(self, image_ids, source):
        """Every caption's image must have features; else one error naming the first few images."""
        missing = [i for i in dict.fromkeys(image_ids) if i not in self._row]
        if missing:
            raise DataError(f'{source}: {len(missing)} images have no features in {self.path} '
                            f'(first: {_first(missing)}); extract them with util/extract_image_features.py or '
                            'check --visual_feature and the id file')

    def frames(self, image_id):
        """(1, D) float32: the image as a one-frame video."""
        r = self._row[image_id]
        return np.array(self._data[r:r + 1], dtype=np.float32)      # a writable copy, not a view of the map


def load_feature_array(path):
    """A 2-d float array from `.npy`, memory-mapped (no pickled objects are ever loaded)."""
    try:
        data = np.load(path, mmap_mode='r', allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f'{path}: feature array missing; download the feature archive of the collection or '
                        'extract CLIP features with util/extract_image_features.py') from None
    except ValueError as e:
        raise DataError(f'{path}: not a plain numeric .npy array ({str(e).splitlines()[0]}); re-save it with '
                        'numpy.save(path, numpy.asarray(features, dtype=numpy.float32))') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror or e}); truncated download? fetch it again') from None
    if data.ndim != 2 or data.dtype.kind != 'f':
        raise DataError(f'{path}: expected a 2-d float array (images x dims), got shape {data.shape} dtype '
                        f'{data.dtype}; re-extract the features')
    return data


def has_bigfile(feature_dir):
    return os.path.isfile(os.path.join(feature_dir, 'feature.bin'))


def open_image_store(rootpath, data_cfg, split):
    """The feature store of a split: the BigFile of `<C>/FeatureData/<feature>/` when there is one (with the
    split's id file as order when present), else the split's id file + `.npy` array."""
    C, feature, data_type = data_cfg['collection'], data_cfg['visual_feature'], data_cfg['data_type']
    fdir = paths.feature_dir(rootpath, C, feature)
    id_file = paths.image_id_file(rootpath, C, split, feature, data_type)
    if has_bigfile(fdir):
        return ImageStore.from_bigfile(fdir, id_file if os.path.isfile(id_file) else None)
    candidates = paths.image_npy_candidates(rootpath, C, split, feature, data_type)
    npy = next((p for p in candidates if os.path.isfile(p)), None)
    if npy is None:
        raise DataError(f'{candidates[0]}: no {split} features for {C} (also looked for '
                        f'{", ".join(os.path.basename(p) for p in candidates[1:]) or "nothing else"} and a BigFile '
                        f'in {fdir}); download the feature archive or run util/extract_image_features.py '
                        f'--images <images> --out {fdir}')
    return ImageStore.from_npy(id_file, npy)


# ============ caption streams ============

def image_languages(rootpath, collection):
    """Target languages of a collection: its preset's, else those with training MT files in TextData."""
    if collection in paths.IMAGE_PRESETS:
        return paths.IMAGE_PRESETS[collection]['languages']
    folder = paths.text_dir(rootpath, collection)
    found = set()
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        stem = name[:-len('.caption.txt')] if name.endswith('.caption.txt') else ''
        head, sep, lang = stem.rpartition('_enc2')
        if sep and head.endswith(('train_google', 'train_baidu')) and lang.isalpha():
            found.add(lang)
    return tuple(sorted(found))


def check_language(rootpath, data_cfg):
    """DataError unless the collection has captions in the data_type's target language and the task exists."""
    C = data_cfg['collection']
    try:
        _, xx = paths.image_target(data_cfg['data_type'])
    except ValueError as e:
        raise DataError(f'--data_type: {e}') from None
    known = image_languages(rootpath, C)
    if known and xx not in known:
        raise DataError(f'{paths.text_dir(rootpath, C)}: collection {C!r} has no {xx!r} captions (languages: '
                        f'{", ".join(known)}); pass --data_type google_enc2<{"|".join(known)}>')
    task = int(data_cfg.get('task', 1))
    tasks = paths.IMAGE_PRESETS.get(C, {}).get('tasks', (1, 2))
    if task not in tasks:
        raise DataError(f'{paths.collection_dir(rootpath, C)}: task {task} does not exist for {C!r} (tasks: '
                        f'{", ".join(map(str, tasks))}); pass --task {tasks[0]}')


def image_streams(rootpath, data_cfg, split):
    """The caption streams of a split (roles src/tr/bt in training, primary/second in val and test; docs/data.md,
    'Image collections'). The original image tester put the human caption in its first slot and fused with
    w = 0.5; the slots here are the video ones (primary = English MT), and w = 0.5 on either slot is the same
    fusion."""
    check_language(rootpath, data_cfg)
    return paths.image_streams(data_cfg['collection'], split, data_cfg['data_type'], int(data_cfg.get('task', 1)),
                               data_cfg.get('clean_eval', 'raw'))


def check_image_collection(rootpath, data_cfg, splits):
    """Before a run starts: the target language and task exist, every caption file of `splits` is there and
    every split's features open (id file and .npy rows agree). One DataError naming the first problem."""
    check_language(rootpath, data_cfg)
    for split in splits:
        for stream in image_streams(rootpath, data_cfg, split):
            paths.resolve_stream(rootpath, data_cfg['collection'], stream)
        open_image_store(rootpath, data_cfg, split)
