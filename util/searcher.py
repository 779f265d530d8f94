"""Text-to-video search with a trained checkpoint: the Python API behind search.py (docs/search.md).

    from util.searcher import Searcher
    s = Searcher.from_checkpoint('RUN_DIR', '~/VisualSearch', 'mine', 'clip_b32')
    for result in s.search(['一只狗在冲浪', 'a dog surfing'], k=10):
        print(result.query, [(h.rank, h.video_id, h.score) for h in result.hits])

Gallery. Every video of a feature folder (video2frames order), or with `split=` the videos of that split's
caption files, in the order the tester reads them. It is encoded once with the checkpoint
(`evaluation.encode_videos`, consecutive batches of `batch_size`, default the tester's 64 for NRCCR and 16 for
MLCMR) and cached beside the run: `<checkpoint folder>/search_cache/<key>/` holds `video_emb.npy` (the model's
output, float32), `video_ids.txt`, `meta.json` and any FAISS index built on it. The key hashes the identity
(absolute path, size, mtime) of the checkpoint, of feature.bin / id.txt / video2frames.txt, of the split's caption
file, and the batch size and frame sampling: change any of them and the gallery is encoded again.

Queries. Any language the text encoder reads. Tokenised as the data layer does (util/data_provider
.build_tokenizer with the checkpoint's lower-casing rule, then .tokenize: `[CLS] ... [SEP]`, no truncation) and
encoded in batches of `batch_size` in the given order. Text rule (`clean`): a query is used as typed by default
('raw', as the human target-language captions are); 'en' applies the English caption cleaning
(basic/captions.clean_english: keep [A-Za-z0-9], lower-case, add a final '.'), as the training and test files'
English streams are; 'auto' cleans queries made only of ASCII characters and leaves the others raw. The
optional English text per query (`second`, e.g. the query's machine translation) is always cleaned, as the
tester's English stream is.

Scores. Cosine similarity: l2-normalised query embeddings times l2-normalised video embeddings (exactly
`evaluation.similarity`). With `second`, the two matrices are fused as the tester fuses its English stream
(role 'primary') with the other language (role 'second'): NRCCR `evaluation.fuse(S_english, S_query, w)`, i.e.
min-max normalised over the whole [queries x videos] matrix of the call; MLCMR `w * S_english + (1 - w) *
S_query`. `w` is the weight on the English text: NRCCR default `sim_ratio` (0.2, its validation setting), MLCMR
the tester's (0.45 for target zh, 0.55 for target en; 0.15 / 0.85 for parallel human_label).
Ranking: descending score, ties by gallery order (as the tester's metrics break them).

When search equals the tester. For the same checkpoint, device, gallery (`split=` the tester's split) and batch
size, and queries = the split's captions in file order passed in one call, the score matrices are bit-identical
to the tester's `sims_second.npy` (the target-language captions as queries), `sims_primary.npy` (the English
captions as queries, clean='en') and `sims_<label>.npy` (queries + second, w = that label's weight), so the
rankings are the same (tests/test_search.py checks this). The batch size matters because the parity defaults pool
text (and NRCCR video) features over padded positions: an embedding depends on the longest item of its batch.
A query searched alone is its own batch (no padding), and NRCCR's fused ranking of a query also depends on the
other queries of the call through the min-max ranges. Calls with more than `block` queries x videos are split
into blocks of queries (the fusion ranges still cover the whole call); a matrix product of another shape may
round differently, so bit-equality is promised for one block only.

Index. 'exact' (default): the matrix product above on `device`. 'faiss': a FAISS inner-product index (faiss-cpu or
faiss-gpu, optional) over the normalised video embeddings, built once and cached beside the gallery; the factory
'Flat' is exact, others (e.g. 'IVF1024,Flat', 'HNSW32') are approximate and scale to millions of videos. With a
second text FAISS fetches `candidates` videos per text and fuses exactly on their union, with the min-max ranges
taken over the candidates (an approximation of the full-matrix ranges).
"""
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

import evaluation
import model as models
from basic import paths
from basic.captions import clean_english
from basic.errors import DataError
from util import data_provider as dp

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = 'search_cache'
CHECKPOINT_NAME = 'model_best.pth.tar'
CLEAN_RULES = ('raw', 'en', 'auto')
BLOCK = 1 << 25           # queries x videos per score block (128 MiB in float32)


# ============ results ============

@dataclass
class Hit:
    rank: int             # 1-based
    video_id: str
    score: float


@dataclass
class Result:
    query: str
    second: object        # the English text fused with the query, or None
    hits: list            # [Hit], best first

    def to_dict(self):
        return asdict(self)


# ============ files and identities ============

def resolve_checkpoint(path):
    """A checkpoint file from a file, a run folder holding model_best.pth.tar, or a folder with exactly one below."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f'{path}: no such checkpoint file or run folder')
    direct = os.path.join(path, CHECKPOINT_NAME)
    if os.path.isfile(direct):
        return direct
    found = sorted(os.path.join(d, CHECKPOINT_NAME) for d, _, files in os.walk(path) if CHECKPOINT_NAME in files)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f'{path}: no {CHECKPOINT_NAME} in this folder or below; give the checkpoint file')
    raise DataError(f'{path}: {len(found)} checkpoints below ({", ".join(found[:3])}, ...); give one of them')


def file_identity(path):
    """(absolute path, size, mtime_ns) of a file, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def prepare_text(text, rule):
    if rule == 'en' or (rule == 'auto' and text.isascii()):
        return clean_english(text)
    return text


def _eval_opts(train_args, rootpath, collection):
    """The options dp.eval_table reads, as the tester derives them from a checkpoint."""
    import argparse
    return argparse.Namespace(
        model=train_args['model'], rootpath=rootpath, collection=collection, strict=False,
        data_type=train_args.get('data_type') or 'google_enc2zh', train_mode=train_args.get('train_mode'),
        label_situation=train_args.get('label_situation'), target_language=train_args.get('target_language'))


def default_weight(model, train_args):
    """The tester's fusion weight on the English stream: NRCCR its validation weight, MLCMR its only one."""
    if not model.fusion_normalize:
        return model.fusion_sweep(target_language=train_args.get('target_language') or 'zh',
                                  train_mode=train_args.get('train_mode') or 'parallel',
                                  label_situation=train_args.get('label_situation') or 'translate')[0][1]
    return float(model.cfg.get('sim_ratio', 0.2))


# ============ gallery cache ============

def _cache_key(meta):
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def load_or_encode_gallery(model, store, video_ids, meta, cache_dir, batch_size, device, workers=0,
                           frame_sampling='first', log=logger.info):
    """(video embeddings [N, D] CPU float32, cache folder or None): from the cache when its key matches."""
    folder = os.path.join(cache_dir, _cache_key(meta)) if cache_dir else None
    if folder and os.path.isfile(os.path.join(folder, 'video_emb.npy')):
        emb = np.load(os.path.join(folder, 'video_emb.npy'))
        with open(os.path.join(folder, 'video_ids.txt'), encoding='latin-1') as f:
            cached_ids = f.read().split('\n')[:-1]
        if cached_ids == list(video_ids) and len(emb) == len(video_ids):
            log(f'gallery: {len(video_ids)} videos from the cache {folder}')
            return torch.from_numpy(emb), folder
    log(f'gallery: encoding {len(video_ids)} videos')
    dataset = dp.VideoDataset(video_ids, store, frame_sampling=frame_sampling)
    emb = evaluation.encode_videos(model, dataset, batch_size, device, workers)
    if folder:
        try:
            tmp = f'{folder}.tmp{os.getpid()}'
            os.makedirs(tmp, exist_ok=True)
            np.save(os.path.join(tmp, 'video_emb.npy'), emb.numpy().astype(np.float32))
            with open(os.path.join(tmp, 'video_ids.txt'), 'w', encoding='latin-1') as f:
                f.write(''.join(f'{v}\n' for v in video_ids))
            with open(os.path.join(tmp, 'meta.json'), 'w') as f:
                json.dump(meta, f, indent=2)
            if os.path.isdir(folder):               # a stale partial folder (ids changed): replace it
                import shutil
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            log(f'gallery cached in {folder}')
        except OSError as e:
            logger.warning('could not write the gallery cache %s (%s); continuing without it', folder, e)
            folder = None
    return emb, folder


# ============ the searcher ============

class Searcher:
    """Scores and ranks a cached gallery for text queries; see the module docstring for the rules."""

    def __init__(self, model, tokenizer, video_ids, video_emb, device='cpu', batch_size=64, weight=0.2,
                 clean='raw', index='exact', faiss_index='Flat', cache_folder=None, block=BLOCK, candidates=1000):
        if clean not in CLEAN_RULES:
            raise ValueError(f'clean must be one of {CLEAN_RULES}, got {clean!r}')
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = torch.device(device)
        self.video_ids = list(video_ids)
        self.video_emb = evaluation.l2_normalize(torch.as_tensor(video_emb).float()).to(self.device)
        self.batch_size, self.weight, self.clean = batch_size, weight, clean
        self.fusion_normalize = model.fusion_normalize
        self.block, self.candidates = block, candidates
        self.index_kind = index
        self.faiss = None
        if index == 'faiss':
            self.faiss = build_faiss_index(self.video_emb.cpu().numpy(), faiss_index, cache_folder, self.device)
        elif index != 'exact':
            raise ValueError(f'index must be "exact" or "faiss", got {index!r}')

    # ---- construction from a run ----
    @classmethod
    def from_checkpoint(cls, checkpoint, rootpath=None, collection=None, feature=None, *, feature_dir=None,
                        split=None, bert_name=None, device='cpu', batch_size=None, workers=0, cache=True,
                        cache_dir=None, index='exact', faiss_index='Flat', weight=None, clean='raw', log=None):
        """A Searcher over the videos of a feature folder (or of a split) for the checkpoint of a run.

        checkpoint: file, run folder, or a folder with exactly one model_best.pth.tar below. rootpath /
        collection / feature default to the run's (the feature folder is <rootpath>/<collection>/FeatureData/
        <feature>); feature_dir overrides the three. split: gallery = the videos of that split's caption files.
        cache_dir: where gallery caches go (default <checkpoint folder>/search_cache); cache=False: none."""
        log = log or logger.info
        path = resolve_checkpoint(checkpoint)
        model, train_args = models.load_model(path, bert_name)
        device = torch.device(device)
        model.to(device).eval()
        collection = collection or train_args.get('collection') or train_args.get('trainCollection')
        feature = feature or train_args.get('visual_feature')
        rootpath = os.path.expanduser(rootpath or train_args.get('rootpath')
                                      or os.path.join('~', 'VisualSearch'))
        if feature_dir is None:
            if not (rootpath and collection and feature):
                raise DataError('give feature_dir, or rootpath, collection and feature (the checkpoint names '
                                f'collection={collection!r}, feature={feature!r})')
            feature_dir = paths.feature_dir(rootpath, collection, feature)
        store = dp.FrameStore(feature_dir)
        if store.dim != model.cfg['visual_feat_dim']:
            raise DataError(f'{feature_dir}: features have {store.dim} dims but the checkpoint {path} expects '
                            f'{model.cfg["visual_feat_dim"]}; use features made like its training features')
        lower_case = train_args.get('tokenizer_lower_case')
        tokenizer = dp.build_tokenizer(bert_name or train_args.get('bert_name') or 'bert-base-multilingual-cased',
                                       True if lower_case is None else bool(lower_case))
        is_mlcmr = train_args['model'] == 'mlcmr'
        batch_size = batch_size or (16 if is_mlcmr else 64)
        frame_sampling = train_args.get('frame_sampling') or 'first'

        if split:
            if not (rootpath and collection):
                raise DataError(f'split={split!r} needs rootpath and collection')
            table = dp.eval_table(_eval_opts(train_args, rootpath, collection), split, tokenizer, purpose='test')
            video_ids = table.videos
            store.check_videos(video_ids, table.files['primary'])
            gallery = {'split': split, 'captions': file_identity(table.files['primary'])}
        else:
            video_ids = list(store.video2frames)
            store.check_videos(video_ids, os.path.join(feature_dir, 'video2frames.txt'))
            gallery = 'all'
        meta = {'checkpoint': file_identity(path), 'gallery': gallery, 'batch_size': batch_size,
                'frame_sampling': frame_sampling,
                'features': [file_identity(os.path.join(feature_dir, n))
                             for n in ('feature.bin', 'id.txt', 'video2frames.txt')]}
        if cache:
            cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), CACHE_DIR_NAME)
        else:
            cache_dir = None
        emb, folder = load_or_encode_gallery(model, store, video_ids, meta, cache_dir, batch_size, device, workers,
                                             frame_sampling, log)
        weight = default_weight(model, train_args) if weight is None else weight
        searcher = cls(model, tokenizer, video_ids, emb, device, batch_size, weight, clean, index, faiss_index, folder)
        searcher.checkpoint, searcher.feature_dir, searcher.cache_folder = path, feature_dir, folder
        return searcher

    # ---- encoding ----
    @torch.inference_mode()
    def encode(self, texts, clean=None):
        """Raw text embeddings [Q, D] (CPU float32) of `texts`, in batches of batch_size, in order."""
        rule = clean or self.clean
        tokens = dp.tokenize(self.tokenizer, [prepare_text(t, rule) for t in texts])
        parts = []
        for i in range(0, len(tokens), self.batch_size):
            stream = dp.move_to(dp.collate_ids(tokens[i:i + self.batch_size]), self.device)
            parts.append(self.model.embed_texts({'query': stream})['query'].float().cpu())
        if not parts:
            return torch.zeros(0, self.video_emb.shape[1])
        return torch.cat(parts)

    def _sims(self, emb, i0, i1):
        return evaluation.l2_normalize(emb[i0:i1].to(self.device)) @ self.video_emb.T

    # ---- scores (exact) ----
    def score_blocks(self, queries, second=None, weight=None, clean=None):
        """Yield (first query row, [B, N] score block) of the exact (fused) similarity matrix."""
        q = self.encode(queries, clean)
        n = len(queries)
        step = max(1, self.block // max(1, len(self.video_ids)))
        if second is None:
            for i0 in range(0, n, step):
                yield i0, self._sims(q, i0, i0 + step)
            return
        if len(second) != n:
            raise ValueError(f'{len(second)} second texts for {n} queries; give one per query (or None)')
        w = self.weight if weight is None else weight
        e = self.encode(second, 'en')
        if not self.fusion_normalize:
            for i0 in range(0, n, step):
                yield i0, w * self._sims(e, i0, i0 + step) + (1 - w) * self._sims(q, i0, i0 + step)
            return
        # min-max over the whole call's matrices, with norm_score's arithmetic (evaluation.norm_score)
        ranges = []
        for emb in (e, q):
            lo = min((self._sims(emb, i0, i0 + step).min() for i0 in range(0, n, step)), key=float)
            top = max(((self._sims(emb, i0, i0 + step) - lo).max() for i0 in range(0, n, step)), key=float)
            ranges.append((lo, top))

        def norm(s, lo, top):
            s = s - lo
            return s / top if top > 0 else s
        for i0 in range(0, n, step):
            yield i0, (w * norm(self._sims(e, i0, i0 + step), *ranges[0])
                       + (1 - w) * norm(self._sims(q, i0, i0 + step), *ranges[1]))

    def scores(self, queries, second=None, weight=None, clean=None):
        """The exact [Q, N] score matrix on CPU (for small calls and tests; search() streams it)."""
        return torch.cat([b.cpu() for _, b in self.score_blocks(queries, second, weight, clean)])

    # ---- search ----
    def search(self, queries, k=10, second=None, weight=None, clean=None):
        """[Result] per query: the k best videos (rank, video id, score), best first."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(second, str):
            second = [second]
        if second is not None and all(s is None or s == '' for s in second):
            second = None
        if second is not None and any(s is None or s == '' for s in second):
            raise ValueError('give a second text for every query or for none')
        k = max(1, min(int(k), len(self.video_ids)))
        if self.faiss is not None:
            ranked = self._faiss_rank(queries, k, second, weight, clean)
        else:
            ranked = []
            for _, block in self.score_blocks(queries, second, weight, clean):
                ranked.extend(topk_stable(block, k))
        return [Result(q, None if second is None else second[i],
                       [Hit(r + 1, self.video_ids[j], float(s)) for r, (j, s) in enumerate(hits)])
                for i, (q, hits) in enumerate(zip(queries, ranked))]

    def _faiss_rank(self, queries, k, second, weight, clean):
        q = evaluation.l2_normalize(self.encode(queries, clean)).numpy()
        if second is None:
            scores, ids = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), k)
            return [[(int(j), float(s)) for j, s in zip(ri, rs) if j >= 0] for ri, rs in zip(ids, scores)]
        e = evaluation.l2_normalize(self.encode(second, 'en')).numpy()
        m = max(k, min(self.candidates, len(self.video_ids)))
        _, ids_q = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), m)
        _, ids_e = self.faiss.search(np.ascontiguousarray(e, dtype=np.float32), m)
        w = self.weight if weight is None else weight
        video = self.video_emb.cpu()
        out = []
        for i in range(len(queries)):
            cand = torch.from_numpy(np.union1d(ids_q[i][ids_q[i] >= 0], ids_e[i][ids_e[i] >= 0]))
            v = video[cand]
            sq, se = v @ torch.from_numpy(q[i]), v @ torch.from_numpy(e[i])
            if self.fusion_normalize:
                sq, se = evaluation.norm_score(sq), evaluation.norm_score(se)
            fused = w * se + (1 - w) * sq
            out.append([(int(cand[j]), s) for j, s in topk_stable(fused.unsqueeze(0), k)[0]])
        return out


def topk_stable(scores, k):
    """Per row of `scores` [Q, N]: the k (column, score) pairs of highest score, ties by ascending column (the
    order of a stable sort of the negated row, as the tester's metrics rank). torch.topk finds the k-th value;
    only the columns at or above it are then sorted."""
    k = min(k, scores.shape[1])
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    out = []
    for row, t in zip(scores, kth):
        cand = torch.nonzero(row >= t).squeeze(1)                    # ascending columns
        vals = row[cand]
        order = torch.sort(-vals, stable=True).indices[:k]
        out.append([(int(c), float(v)) for c, v in zip(cand[order].tolist(), vals[order].tolist())])
    return out


# ============ FAISS ============

def _require_faiss():
    try:
        import faiss
    except ImportError:
        raise DataError('--index faiss needs FAISS: pip install faiss-cpu (or faiss-gpu), see '
                        'requirements-optional.txt; or use the default exact search') from None
    return faiss


def build_faiss_index(video_emb, factory='Flat', cache_folder=None, device=torch.device('cpu')):
    """An inner-product FAISS index over `video_emb` (normalised, [N, D] float32), read from / written to
    `cache_folder`/faiss_<factory>.index."""
    faiss = _require_faiss()
    name = 'faiss_' + ''.join(c if c.isalnum() else '_' for c in factory) + '.index'
    path = os.path.join(cache_folder, name) if cache_folder else None
    if path and os.path.isfile(path):
        index = faiss.read_index(path)
        if index.ntotal != len(video_emb) or index.d != video_emb.shape[1]:
            index = None
    else:
        index = None
    if index is None:
        x = np.ascontiguousarray(video_emb, dtype=np.float32)
        try:
            index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise DataError(f'--faiss_index {factory!r}: not a FAISS index factory string ({str(e).splitlines()[0]})') \
                from None
        if not index.is_trained:
            index.train(x)
        index.add(x)
        if path:
            tmp = f'{path}.tmp{os.getpid()}'
            faiss.write_index(index, tmp)
            os.replace(tmp, path)
    if device.type == 'cuda' and hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    return index
