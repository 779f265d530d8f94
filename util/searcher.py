"""Text-to-video search with a trained checkpoint, or with no training from a multilingual CLIP text model: the
Python API behind search.py (docs/search.md).

    from util.searcher import Searcher
    s = Searcher.from_checkpoint('RUN_DIR', '~/VisualSearch', 'mine', 'clip_b32')
    s = Searcher.zero_shot('sentence-transformers/clip-ViT-B-32-multilingual-v1', '~/VisualSearch', 'mine', 'clip_b32')
    for result in s.search(['一只狗在冲浪', 'a dog surfing'], k=10):
        print(result.query, [(h.rank, h.video_id, h.score) for h in result.hits])

Zero-shot (`Searcher.zero_shot`): the model is the untrained multilingual CLIP model (nets/mclip.py), built from
the text model alone; everything below applies to it as to a checkpoint, with the gallery cache in
`<feature folder>/search_cache/` and the text model's identity (hub id, or its folder's files) in the key.

Gallery. Every video of a feature folder (video2frames order), or with `split=` the videos of that split's
caption files, in the order the tester reads them. It is encoded once with the checkpoint
(`evaluation.encode_videos`, consecutive batches of `batch_size`, default the tester's 64 for NRCCR and 16 for
MLCMR) and cached beside the run: `<checkpoint folder>/search_cache/<key>/` holds `video_emb.npy` (the model's
output, float32), `video_ids.txt`, `meta.json` and any FAISS index built on it. The key hashes the identity
(absolute path, size, mtime) of the checkpoint, of feature.bin / id.txt / video2frames.txt, of the split's caption
file, and the batch size and frame sampling: change any of them and the gallery is encoded again.

Queries. Any language the text encoder reads. Tokenised as the data layer does (basic/data_provider
.build_tokenizer with the checkpoint's lower-casing rule, then .tokenize: `[CLS] ... [SEP]`, no truncation) and
encoded in batches of `batch_size` in the given order. Text rule (`clean`): a query is used as typed by default
('raw', as the human target-language captions are); 'en' applies the English caption cleaning
(basic/captions.clean_english: keep [A-Za-z0-9], lower-case, add a final '.'), as the training and test files'
English streams are; 'auto' cleans queries made only of ASCII characters and leaves the others raw. The
optional English text per query (`second`, e.g. the query's machine translation) is always cleaned, as the
tester's English stream is.

Scores. Cosine similarity in float64: l2-normalised query embeddings times l2-normalised video embeddings,
both normalised in float64 from the float32 embeddings (exactly `evaluation.similarity`, whose matrices the
tester's metrics rank). With `second`, the two matrices are fused as the tester fuses its English stream
(role 'primary') with the other language (role 'second'): NRCCR `evaluation.fuse(S_english, S_query, w)`, i.e.
min-max normalised over the whole [queries x videos] matrix of the call; MLCMR `w * S_english + (1 - w) *
S_query`. `w` is the weight on the English text: NRCCR default `sim_ratio` (0.2, its validation setting), MLCMR
the tester's (0.45 for target zh, 0.55 for target en; 0.15 / 0.85 for parallel human_label).
Ranking: descending score, ties by gallery order (as the tester's metrics break them).

Exact search (`scoring`). 'dense': a float64 copy of the unit gallery and the float64 [queries x videos]
product, the tester's arithmetic. 'two-stage': a low-precision copy of the unit gallery (bfloat16 on CPU)
scores every video, a rigorous bound on the low-precision error keeps every video that can still be in the
top k, and only those are re-scored in float64 (LowPrecisionGallery has the derivation and the proof): the
same top-k, reading 2 bytes per gallery entry per query instead of 8. 'auto' (default): dense for a `split`
gallery and up to DENSE_LIMIT videos x dims, two-stage above. Both return the float64 scores.

When search equals the tester. For the same checkpoint, device, gallery (`split=` the tester's split) and
batch size, and queries = the split's captions in file order passed in one call, the float64 score matrices
are bit-identical to the ones the tester's metrics rank, which it saves as float32 in `sims_second.npy` (the
target-language captions as queries), `sims_primary.npy` (the English captions as queries, clean='en') and
`sims_<label>.npy` (queries + second, w = that label's weight); `tester.py --save_embeddings 1` saves the
embeddings they are built from. So the rankings are the same (tests/test_search.py checks this). The
two-stage path scores each video with a row-wise float64 product, which may differ from the tester's matrix
product in the last bit (about 1e-16): its ranking agrees except between videos whose float64 scores differ
by that much. The batch size matters because the parity defaults pool text (and NRCCR video) features over
padded positions: an embedding depends on the longest item of its batch. A query searched alone is its own
batch (no padding), and NRCCR's fused ranking of a query also depends on the other queries of the call
through the min-max ranges. Calls with more than `block` queries x videos are split into blocks of queries
(the fusion ranges still cover the whole call); a matrix product of another shape may round differently, so
bit-equality is promised for one block only.

Index. 'exact' (default): the dense or two-stage search above on `device`. 'faiss': a FAISS inner-product
index (faiss-cpu or faiss-gpu, optional) over the float32 normalised video embeddings, built once and cached
beside the gallery; the factory 'Flat' is exact in float32 (scores and near-ties may differ from the float64
ones in the 7th digit), others (e.g. 'IVF1024,Flat', 'HNSW32') are approximate and scale to millions of
videos. With a second text FAISS fetches `candidates` videos per text and fuses exactly on their union, with
the min-max ranges taken over the candidates (an approximation of the full-matrix ranges).

Moments and time ranges. With `moments=(window, stride)` the gallery is the windows of the videos
(basic/media.py: windows of consecutive frames, from the frame times util/extract_features.py records), one
row per window, each encoded as a short video by the same model and path (GallerySource.encode) and cached
under its own key; a Hit then names the window's video, start and end seconds. Whole-video hits carry the
video's time range when the frame times are known, None otherwise (imported features).

Speed (util/bench/search.py, docs/search.md 'Large galleries'): `encode` runs under torch.inference_mode in
one batch per call; `amp` ('bf16' / 'fp16') autocasts the text encoder only when asked (scores change
slightly; the gallery is always encoded in float32).
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch

import evaluation
import model as models
from basic import media, paths
from basic.captions import clean_english
from basic.errors import DataError
from basic import data_provider as dp
from basic.precision import autocast_factory

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = 'search_cache'
CHECKPOINT_NAME = 'model_best.pth.tar'
CLEAN_RULES = ('raw', 'en', 'auto')
BLOCK = 1 << 25           # queries x videos per score block (256 MiB in float64)
SCORING = ('auto', 'dense', 'two-stage')


# ============ results ============

@dataclass
class Hit:
    rank: int             # 1-based
    video_id: str
    score: float
    start: object = None  # seconds of the matched video or window (None: unknown, e.g. imported features)
    end: object = None    # None: unknown, or to the end of the file


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


def folder_identity(name):
    """A model's identity for cache keys: a hub id as it is; a folder as the identities of its files."""
    if not os.path.isdir(name):
        return name
    return [file_identity(os.path.join(d, f)) for d, _, files in sorted(os.walk(name)) for f in sorted(files)]


def _feature_dir(rootpath, data_cfg, who):
    collection, feature = data_cfg['collection'], data_cfg['visual_feature']
    if not (rootpath and collection and feature):
        raise DataError(f'give feature_dir, or rootpath, collection and feature ({who} names '
                        f'collection={collection!r}, feature={feature!r})')
    return paths.feature_dir(rootpath, collection, feature)


def prepare_text(text, rule):
    if rule == 'en' or (rule == 'auto' and text.isascii()):
        return clean_english(text)
    return text


def default_weight(model, data_cfg):
    """The tester's fusion weight on the English stream: NRCCR its validation weight, MLCMR its only one."""
    if not model.fusion_normalize:
        return model.fusion_sweep(target_language=data_cfg['target_language'], train_mode=data_cfg['train_mode'],
                                  label_situation=data_cfg['label_situation'])[0][1]
    return float(model.cfg.get('sim_ratio', 0.2))


# ============ gallery cache ============

def _cache_key(meta):
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def load_or_encode_gallery(model, store, video_ids, meta, cache_dir, batch_size, device, workers=0,
                           frame_sampling='first', log=logger.info, dataset=None, what='videos'):
    """(video embeddings [N, D] CPU float32, cache folder or None): from the cache when its key matches and its
    files read back whole, else encoded (and cached; a failed encoding or write leaves the cache as it was).
    `dataset`: the items to encode (default the videos `video_ids` of `store`; Moments: their windows, one row
    per item, `video_ids` then names each row's video)."""
    folder = os.path.join(cache_dir, _cache_key(meta)) if cache_dir else None
    if folder and os.path.isfile(os.path.join(folder, 'video_emb.npy')):
        emb = read_cached_gallery(folder, video_ids, log)
        if emb is not None:
            log(f'gallery: {len(video_ids)} {what} from the cache {folder}')
            return torch.from_numpy(emb), folder
    log(f'gallery: encoding {len(video_ids)} {what}')
    if dataset is None:
        dataset = dp.VideoDataset(video_ids, store, frame_sampling=frame_sampling)
    emb = evaluation.encode_videos(model, dataset, batch_size, device, workers)
    if folder:
        try:
            write_cached_gallery(folder, emb, video_ids, meta)
            log(f'gallery cached in {folder}')
        except OSError as e:
            logger.warning('could not write the gallery cache %s (%s); continuing without it', folder, e)
            folder = None
    return emb, folder


def read_cached_gallery(folder, video_ids, log):
    """The cached embeddings of `video_ids`, or None when the folder's files are unreadable (truncated, torn)
    or hold other videos: a miss, encoded again."""
    try:
        emb = np.load(os.path.join(folder, 'video_emb.npy'))
        with open(os.path.join(folder, 'video_ids.txt'), encoding='latin-1') as f:
            cached_ids = f.read().split('\n')[:-1]
    except (OSError, ValueError, EOFError) as e:
        log(f'gallery cache {folder} unreadable ({type(e).__name__}): encoding again')
        return None
    if cached_ids != list(video_ids) or emb.ndim != 2 or len(emb) != len(video_ids):
        return None
    return emb


def write_cached_gallery(folder, emb, video_ids, meta):
    """Write the cache folder whole in a temporary folder, then move it into place; a folder already there
    (unreadable, or of other videos) is moved away first and deleted only once the new one is in place. A
    failed write removes its temporary folder and leaves `folder` as it was."""
    tmp = f'{folder}.tmp{os.getpid()}'
    try:
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, 'video_emb.npy'), emb.numpy().astype(np.float32))
        with open(os.path.join(tmp, 'video_ids.txt'), 'w', encoding='latin-1') as f:
            f.write(''.join(f'{v}\n' for v in video_ids))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        old = None
        if os.path.isdir(folder):
            old = f'{folder}.old{os.getpid()}'
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)
                raise
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ============ what a gallery is encoded from: videos, or windows of them (moments) ============

@dataclass
class GallerySource:
    """The videos of a frame store and how to encode them; kept by the Searcher, so that the same model can also
    search the windows of the same videos (Searcher.for_moments)."""
    store: object             # data_provider.FrameStore
    video_ids: list
    meta: dict                # identity of checkpoint, features, gallery and encoding: the cache key
    cache_dir: object         # None: no cache
    batch_size: int
    workers: int = 0
    frame_sampling: str = 'first'

    def encode(self, model, device, moments=None, log=logger.info):
        """(row video ids, embeddings [N, D] float32, spans [(start, end)] or None, cache folder): one row per
        video, or with moments=(window, stride) seconds one per window (basic/media.py), each window encoded as
        a short video by the same path. Spans come from the extractor's frame times (None without them)."""
        times = media.load_frame_times(self.store.path, self.store.video2frames)
        if moments is None:
            emb, folder = load_or_encode_gallery(model, self.store, self.video_ids, self.meta, self.cache_dir,
                                                 self.batch_size, device, self.workers, self.frame_sampling, log)
            spans = None if times is None else [media.video_span(times[v]) if v in times else (None, None)
                                                for v in self.video_ids]
            return self.video_ids, emb, spans, folder
        windows = media.make_windows(self.video_ids, times, *moments, source=self.store.path)
        meta = dict(self.meta, moments=list(moments),
                    frame_times=file_identity(os.path.join(self.store.path, media.FRAME_TIMES)))
        ids = [w.video_id for w in windows]
        dataset = dp.VideoDataset(range(len(windows)), media.WindowFrames(self.store, windows),
                                  frame_sampling=self.frame_sampling)
        log(f'moments: {len(windows)} windows of {moments[0]:g} s, stride {moments[1]:g} s, in '
            f'{len(self.video_ids)} videos')
        emb, folder = load_or_encode_gallery(model, self.store, ids, meta, self.cache_dir, self.batch_size, device,
                                             self.workers, self.frame_sampling, log, dataset=dataset, what='windows')
        return ids, emb, [(w.start, w.end) for w in windows], folder


# ============ exact scores: dense float64, or a two-stage search for large galleries ============

# "Exact" is the tester's arithmetic (evaluation.similarity): the float64 cosine of the float32 embeddings,
# l2_normalize(q.double()) . l2_normalize(v.double()), ranked by descending score, ties by gallery order.
DENSE_LIMIT = 1 << 22      # videos x dims up to which 'auto' keeps a float64 gallery (32 MiB) and scores densely
U64 = 2.0 ** -53           # unit roundoff of float64
TINY = 2.0 ** -126         # smallest normal float32 / bfloat16: what one flushed sub-normal can change
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
# largest absolute error of rounding a result to the output type near zero (sub-normal spacing, or a flush)
OUTPUT_ABS = {torch.bfloat16: TINY, torch.float16: 2.0 ** -14, torch.float32: TINY}
PREFILTER_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def unit64(x):
    """float64 unit rows of float32 embeddings, exactly as evaluation.similarity normalises them."""
    return evaluation.l2_normalize(torch.as_tensor(x).double())


def gamma(n, u):
    """gamma_n = n u / (1 - n u): a sum of n terms computed with unit roundoff u, in any order, is off by at
    most gamma_n times the sum of the terms' magnitudes (Higham, Accuracy and Stability, section 3.1)."""
    return n * u / (1 - n * u)


def float32_at_most(x):
    """The largest float32 <= x (a comparison with a float32 tensor rounds a Python float to float32)."""
    f = np.float32(x)
    return float(np.nextafter(f, np.float32(-np.inf)) if float(f) > x else f)


class LowPrecisionGallery:
    """The pre-filter of the two-stage exact search: a low-precision copy of the unit gallery and a rigorous
    bound on how far its scores are from the exact ones.

    Notation, for one query: q, v the float64 unit vectors of the exact path (`unit64`), s = fl64(q . v) the
    exact score; q', v' their low-precision copies (bfloat16 by default on CPU, see Searcher); l the score
    the kernel returns for q' . v' (products accumulated in float32, the result rounded to the low type, unit
    roundoffs u_acc = 2^-24 and u_out). Then, with D the dimension and |.| the 2-norm:

        |s - q.v|          <= gamma_D(2^-53) |q| |v|                      float64 dot product
        |q.v - q'.v'|       = |(q - q').v + q'.(v - v')| <= e_q |v| + |q'| e_v
        |fl(q'.v') - q'.v'| <= gamma_D(u_acc) |q'| |v'|                    float32 accumulation, any order
        |l - fl(q'.v')|     <= u_out (1 + gamma_D(u_acc)) |q'| |v'| + a_out rounding (or flushing) the output

    where e_q = |q - q'| is measured per query and e_v = max_j |v_j - v'_j|, |v'| = max_j |v'_j|, |v| =
    max_j |v_j| are measured once over the gallery (so no assumption on how the copies were rounded), plus
    4 D 2^-126 for sub-normal inputs, products and sums a kernel may flush to zero. The bound B is the sum,
    times (1 + 1e-6) for the float64 arithmetic that evaluates it (all terms are non-negative). When the
    float32 matmul precision is not 'highest' (TF32 / bfloat16 inside float32 matmuls), a float32 pre-filter
    adds (2u + u^2) |q'| |v'| for that input rounding (u = 2^-8, the coarser of the two).

    Candidates. Let lambda_k be the k-th best low score and sigma_k the k-th best exact score. The k videos of
    best low score all have s >= lambda_k - B, so sigma_k >= lambda_k - B; every video with s >= sigma_k has
    l >= s - B >= lambda_k - 2B. Keeping every video with l >= lambda_k - 2B therefore keeps all videos scoring
    sigma_k or more (ties included), and ranking the kept ones by their exact float64 scores, ties by gallery
    order, gives the exact top-k. The threshold is rounded down to the type of l before comparing.

    The float32 accumulation is the one assumption about the kernel (oneDNN's bfloat16 GEMM and PyTorch's CPU
    float16 GEMV accumulate in float32); `probe` checks it at construction on a sum that a low-precision
    accumulator gets wrong by far more than B, and Searcher falls back to a float32 pre-filter if it fails."""

    def __init__(self, video_emb, dtype=torch.bfloat16, device='cpu', chunk=8192):
        n, d = video_emb.shape
        self.dtype, self.device, self.dim = dtype, torch.device(device), d
        self.emb = torch.empty(n, d, dtype=dtype, device=self.device)
        e_v = norm_low = norm_unit = 0.0
        for i in range(0, n, chunk):
            u = unit64(video_emb[i:i + chunk])
            low = u.to(dtype)
            e_v = max(e_v, (u - low.double()).norm(dim=1).max().item())
            norm_low = max(norm_low, low.double().norm(dim=1).max().item())
            norm_unit = max(norm_unit, u.norm(dim=1).max().item())
            self.emb[i:i + chunk] = low.to(self.device)
        self.e_v, self.norm_low, self.norm_unit = e_v, norm_low, norm_unit
        self.u_out = UNIT_ROUNDOFF[dtype]
        self.g_acc = gamma(d, UNIT_ROUNDOFF[torch.float32])
        self.u_in_extra = 0.0
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != 'highest':
            self.u_in_extra = 2 * 2.0 ** -8 + 2.0 ** -16
        self.absolute = OUTPUT_ABS[dtype] + 4 * d * TINY

    def probe(self):
        """True when the kernel's error on a sum that needs a float32 accumulator stays within the bound:
        1 + (D-1) u with u the low type's unit roundoff (a low-precision accumulator stalls at 1 or 2)."""
        d, u = self.dim, UNIT_ROUNDOFF[self.dtype]
        q = torch.full((1, d), u, dtype=torch.float64)
        q[0, 0] = 1.0
        rows = torch.ones(4, d, dtype=self.dtype, device=self.device)
        got = (q.to(self.dtype).to(self.device) @ rows.T).double().cpu()
        exact = 1.0 + (d - 1) * u
        allowed = (self.g_acc + self.u_out * (1 + self.g_acc)) * exact + self.absolute
        return bool(((got - exact).abs() <= allowed * (1 + 1e-6)).all())

    def scores(self, q):
        """(low scores [B, N] float32 on the device, bound B [B] float64) for float64 unit queries q [B, D]."""
        low_q = q.to(self.dtype)
        e_q = (q - low_q.double()).norm(dim=1)
        n_low_q = low_q.double().norm(dim=1)
        products = n_low_q * self.norm_low
        bound = (e_q * self.norm_unit + n_low_q * self.e_v
                 + (self.g_acc + self.u_out * (1 + self.g_acc) + self.u_in_extra) * products
                 + gamma(self.dim, U64) * q.norm(dim=1) * self.norm_unit + self.absolute) * (1 + 1e-6)
        return (low_q.to(self.device) @ self.emb.T).float(), bound


def refine(low, bound, k, exact):
    """The exact top-k of one query from its low scores [N] (float32 or float64) and bound B: every video
    with low >= k-th best low - 2B is re-scored by `exact(columns) -> float64 scores`; returns
    ([(column, exact score)] best first, number of candidates)."""
    kth = torch.topk(low, k).values[-1].item()
    threshold = kth - 2 * float(bound)
    if low.dtype == torch.float32:
        threshold = float32_at_most(threshold)
    cand = torch.nonzero(low >= threshold).squeeze(1).cpu()        # ascending columns
    s = exact(cand)
    order = torch.sort(-s, stable=True).indices[:k]
    return list(zip(cand[order].tolist(), s[order].tolist())), len(cand)


# ============ the searcher ============

class Searcher:
    """Scores and ranks a cached gallery for text queries; see the module docstring for the rules."""

    def __init__(self, model, tokenizer, video_ids, video_emb, device='cpu', batch_size=64, weight=0.2,
                 clean='raw', index='exact', faiss_index='Flat', cache_folder=None, block=BLOCK, candidates=1000,
                 scoring='auto', prefilter='auto', amp='off', spans=None):
        if clean not in CLEAN_RULES:
            raise ValueError(f'clean must be one of {CLEAN_RULES}, got {clean!r}')
        if index not in ('exact', 'faiss'):
            raise ValueError(f'index must be "exact" or "faiss", got {index!r}')
        if scoring not in SCORING:
            raise ValueError(f'scoring must be one of {SCORING}, got {scoring!r}')
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = torch.device(device)
        self.video_ids = list(video_ids)
        self.spans = None if spans is None else list(spans)             # [(start, end)] seconds per row
        self.video_emb = torch.as_tensor(video_emb).float().cpu()      # the model's output, as cached
        n, d = self.video_emb.shape
        self.batch_size, self.weight, self.clean = batch_size, weight, clean
        self.fusion_normalize = model.fusion_normalize
        self.block, self.candidates = block, candidates
        self.autocast = autocast_factory(amp, self.device)
        self.index_kind = index
        self.last_candidates = []          # two-stage: videos re-scored per query of the last search
        self.faiss, self.video64, self.low = None, None, None
        if index == 'faiss':
            self.faiss = build_faiss_index(self.unit32().numpy(), faiss_index, cache_folder, self.device)
            scoring = 'dense' if scoring == 'auto' else scoring
        self.scoring = scoring if scoring != 'auto' else ('dense' if n * d <= DENSE_LIMIT else 'two-stage')
        if self.scoring == 'dense':
            self.video64 = unit64(self.video_emb).to(self.device)
        elif index == 'exact':
            self.low = self._prefilter(prefilter)

    def _prefilter(self, name):
        """The low-precision gallery: bfloat16 on CPU by default (half the bytes of float32; a GEMM with
        float32 accumulation for query blocks too), float32 on CUDA (bandwidth is not the limit there, and
        cuBLAS may reduce bfloat16 sums in reduced precision)."""
        if name == 'auto':
            name = 'float32' if self.device.type == 'cuda' else 'bfloat16'
        if name not in PREFILTER_DTYPES:
            raise ValueError(f'prefilter must be auto or one of {sorted(PREFILTER_DTYPES)}, got {name!r}')
        low = LowPrecisionGallery(self.video_emb, PREFILTER_DTYPES[name], self.device)
        if not low.probe():
            logger.warning('the %s matmul on %s does not accumulate in float32; using a float32 pre-filter',
                           name, self.device)
            low = LowPrecisionGallery(self.video_emb, torch.float32, self.device)
        return low

    def unit32(self):
        """float32 unit video embeddings (for FAISS)."""
        return evaluation.l2_normalize(self.video_emb)

    # ---- construction from a run ----
    @classmethod
    def from_checkpoint(cls, checkpoint, rootpath=None, collection=None, feature=None, *, feature_dir=None,
                        split=None, bert_name=None, device='cpu', batch_size=None, workers=0, cache=True,
                        cache_dir=None, index='exact', faiss_index='Flat', weight=None, clean='raw',
                        scoring='auto', prefilter='auto', amp='off', moments=None, log=None):
        """A Searcher over the videos of a feature folder (or of a split) for the checkpoint of a run.

        checkpoint: file, run folder, or a folder with exactly one model_best.pth.tar below. rootpath /
        collection / feature default to the run's (the feature folder is <rootpath>/<collection>/FeatureData/
        <feature>); feature_dir overrides the three. split: gallery = the videos of that split's caption files,
        read with the checkpoint's data config as the tester reads them. cache_dir: where gallery caches go
        (default <checkpoint folder>/search_cache); cache=False: none. moments=(window, stride) seconds: the
        gallery is the windows of those videos (docs/search.md, 'Moments')."""
        path = resolve_checkpoint(checkpoint)
        model, train_args = models.load_model(path, bert_name)
        data_cfg = dp.checkpoint_data_config(path, train_args)
        for key, value in (('collection', collection), ('visual_feature', feature), ('bert_name', bert_name)):
            if value is not None:
                data_cfg[key] = value
        rootpath = os.path.expanduser(rootpath or train_args.get('rootpath') or os.path.join('~', 'VisualSearch'))
        feature_dir = feature_dir or _feature_dir(rootpath, data_cfg, 'the checkpoint')
        store = dp.FrameStore(feature_dir)
        if store.dim != model.cfg['visual_feat_dim']:
            raise DataError(f'{feature_dir}: features have {store.dim} dims but the checkpoint {path} expects '
                            f'{model.cfg["visual_feat_dim"]}; use features made like its training features')
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), CACHE_DIR_NAME)
        searcher = cls._over_gallery(model, data_cfg, rootpath, store, {'checkpoint': file_identity(path)}, split,
                                     device, batch_size, workers, cache_dir if cache else None, moments, log,
                                     weight=weight, clean=clean, index=index, faiss_index=faiss_index,
                                     scoring=scoring, prefilter=prefilter, amp=amp)
        searcher.checkpoint = path
        return searcher

    @classmethod
    def zero_shot(cls, text_model, rootpath=None, collection=None, feature=None, *, feature_dir=None, split=None,
                  data_type='google_enc2zh', frame_sampling='uniform', device='cpu', batch_size=None, workers=0,
                  cache=True, cache_dir=None, index='exact', faiss_index='Flat', weight=None, clean='raw',
                  scoring='auto', prefilter='auto', amp='off', moments=None, log=None):
        """A Searcher with no training (docs/search.md, 'No training: multilingual CLIP'): a video is the mean of its
        l2-normalised CLIP frame embeddings, a query the embedding of `text_model` (a multilingual
        sentence-transformers CLIP text model, e.g. sentence-transformers/clip-ViT-B-32-multilingual-v1, or a CLIP
        model for English), the score their cosine: the untrained multilingual CLIP model (model.zero_shot_model).

        The feature folder is feature_dir, or <rootpath>/<collection>/FeatureData/<feature>; its features must
        come from the CLIP the text model is aligned to (one-line error otherwise). split: gallery = the videos of
        that split's caption files (NRCCR naming, `data_type`). Videos over 64 frames are read as 64 spread over the
        video (`frame_sampling`). cache_dir: default <feature folder>/search_cache; the key covers the text model.
        moments: as for a checkpoint."""
        rootpath = os.path.expanduser(rootpath or os.path.join('~', 'VisualSearch'))
        data_cfg = dp.data_config(model=models.ZERO_SHOT.CAPTIONS, collection=collection, visual_feature=feature,
                                  data_type=data_type, bert_name=text_model, frame_sampling=frame_sampling)
        feature_dir = feature_dir or _feature_dir(rootpath, data_cfg, 'zero-shot search')
        store = dp.FrameStore(feature_dir)
        model = models.zero_shot_model(text_model, feature_dir, store.dim)
        cache_dir = cache_dir or os.path.join(feature_dir, CACHE_DIR_NAME)
        searcher = cls._over_gallery(model, data_cfg, rootpath, store, {'text_model': folder_identity(text_model)},
                                     split, device, batch_size, workers, cache_dir if cache else None, moments, log,
                                     weight=weight, clean=clean, index=index, faiss_index=faiss_index,
                                     scoring=scoring, prefilter=prefilter, amp=amp)
        searcher.text_model = text_model
        return searcher

    @classmethod
    def _over_gallery(cls, model, data_cfg, rootpath, store, identity, split, device, batch_size, workers,
                      cache_dir, moments, log, weight=None, **settings):
        """What both constructors share: the tokenizer (the model class's), the gallery (all videos of the store,
        or a split's), its GallerySource (the cache key: `identity` of what made the model, the gallery, features,
        batch size, frame sampling) and the Searcher over it (`over`)."""
        log = log or logger.info
        device = torch.device(device)
        model.to(device).eval()
        model_class = type(model)
        tokenizer = model_class.build_tokenizer(data_cfg)
        batch_size = batch_size or model_class.RUN_DEFAULTS['test_batch_size']
        frame_sampling = data_cfg['frame_sampling']
        if split:
            if not (rootpath and data_cfg['collection']):
                raise DataError(f'split={split!r} needs rootpath and collection')
            table = dp.eval_table(rootpath, data_cfg, split, tokenizer, purpose='test',
                                  target_language=dp.target_language(data_cfg))
            video_ids = table.videos
            store.check_videos(video_ids, table.files[paths.ROLE_PRIMARY])
            gallery = {'split': split, 'captions': file_identity(table.files[paths.ROLE_PRIMARY])}
        else:
            video_ids = list(store.video2frames)
            store.check_videos(video_ids, os.path.join(store.path, 'video2frames.txt'))
            gallery = 'all'
        meta = dict(identity, gallery=gallery, batch_size=batch_size, frame_sampling=frame_sampling,
                    features=[file_identity(os.path.join(store.path, n))
                              for n in ('feature.bin', 'id.txt', 'video2frames.txt')])
        source = GallerySource(store, video_ids, meta, cache_dir, batch_size, workers, frame_sampling)
        weight = default_weight(model, data_cfg) if weight is None else weight
        if split and settings.get('scoring', 'auto') == 'auto':
            settings['scoring'] = 'dense'            # a split's gallery: the tester's arithmetic, bit for bit
        searcher = cls.over(model, tokenizer, source, moments, device, log, weight=weight, **settings)
        searcher.feature_dir = store.path
        return searcher

    @classmethod
    def over(cls, model, tokenizer, source, moments=None, device='cpu', log=None, **settings):
        """A Searcher of `model` over the videos of `source` (a GallerySource), or with moments=(window, stride)
        over their windows; `settings`: the constructor's weight, clean, index, ... ."""
        ids, emb, spans, folder = source.encode(model, device, moments, log or logger.info)
        searcher = cls(model, tokenizer, ids, emb, device, source.batch_size, cache_folder=folder, spans=spans,
                       **settings)
        searcher.source, searcher.settings, searcher.moments, searcher.cache_folder = source, settings, moments, folder
        return searcher

    def for_moments(self, moments, log=None):
        """The same model and settings over the windows (moments=(window, stride) seconds) of this searcher's
        videos; the model is shared, not loaded again."""
        return type(self).over(self.model, self.tokenizer, self.source, moments, self.device, log, **self.settings)

    # ---- encoding ----
    @torch.inference_mode()
    def encode(self, texts, clean=None):
        """Raw text embeddings [Q, D] (CPU float32) of `texts`, in batches of batch_size, in order."""
        rule = clean or self.clean
        tokens = dp.tokenize(self.tokenizer, [prepare_text(t, rule) for t in texts])
        parts = []
        for i in range(0, len(tokens), self.batch_size):
            stream = dp.move_to(dp.collate_ids(tokens[i:i + self.batch_size]), self.device)
            with self.autocast():
                parts.append(self.model.embed_texts({'query': stream})['query'].float().cpu())
        if not parts:
            return torch.zeros(0, self.video_emb.shape[1])
        return torch.cat(parts)

    # ---- dense float64 scores (the tester's matrices) ----
    def _gallery64(self):
        return self.video64 if self.video64 is not None else unit64(self.video_emb).to(self.device)

    def score_blocks(self, queries, second=None, weight=None, clean=None):
        """Yield (first query row, [B, N] float64 block) of the exact (fused) similarity matrix, with the
        tester's arithmetic (evaluation.similarity, evaluation.fuse)."""
        q = self.encode(queries, clean)
        e = None if second is None else self.encode(second, 'en')
        if second is not None and len(second) != len(queries):
            raise ValueError(f'{len(second)} second texts for {len(queries)} queries; give one per query (or None)')
        yield from self._score_blocks(q, e, self.weight if weight is None else weight)

    def _score_blocks(self, q, e, w):
        gallery = self._gallery64()
        q = unit64(q)
        n = len(q)
        step = max(1, self.block // max(1, len(self.video_ids)))

        def sims(emb, i0):
            return emb[i0:i0 + step].to(self.device) @ gallery.T
        if e is None:
            for i0 in range(0, n, step):
                yield i0, sims(q, i0)
            return
        e = unit64(e)
        if not self.fusion_normalize:
            for i0 in range(0, n, step):
                yield i0, w * sims(e, i0) + (1 - w) * sims(q, i0)
            return
        # min-max over the whole call's matrices, with norm_score's arithmetic (evaluation.norm_score)
        ranges = []
        for emb in (e, q):
            lo = min((sims(emb, i0).min() for i0 in range(0, n, step)), key=float)
            top = max(((sims(emb, i0) - lo).max() for i0 in range(0, n, step)), key=float)
            ranges.append((lo, top))

        def norm(s, lo, top):
            s = s - lo
            return s / top if top > 0 else s
        for i0 in range(0, n, step):
            yield i0, w * norm(sims(e, i0), *ranges[0]) + (1 - w) * norm(sims(q, i0), *ranges[1])

    def scores(self, queries, second=None, weight=None, clean=None):
        """The exact [Q, N] float64 score matrix on CPU (for small calls and tests; search() streams it)."""
        return torch.cat([b.cpu() for _, b in self.score_blocks(queries, second, weight, clean)])

    # ---- search ----
    def search(self, queries, k=10, second=None, weight=None, clean=None):
        """[Result] per query: the k best videos (rank, video id, score), best first."""
        if int(k) < 1:
            raise ValueError(f'k={k}: ask for at least one result per query')
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(second, str):
            second = [second]
        if second is not None and all(s is None or s == '' for s in second):
            second = None
        if second is not None and any(s is None or s == '' for s in second):
            raise ValueError('give a second text for every query or for none')
        if second is not None and len(second) != len(queries):
            raise ValueError(f'{len(second)} second texts for {len(queries)} queries; give one per query (or None)')
        q_emb = self.encode(queries, clean)
        e_emb = None if second is None else self.encode(second, 'en')
        ranked = self.rank(q_emb, k, e_emb, weight)
        return [Result(query, None if second is None else second[i],
                       [Hit(r + 1, self.video_ids[j], float(s), *self.span(j)) for r, (j, s) in enumerate(hits)])
                for i, (query, hits) in enumerate(zip(queries, ranked))]

    def span(self, j):
        """(start, end) seconds of gallery row j, (None, None) when unknown."""
        return self.spans[j] if self.spans is not None else (None, None)

    def rank(self, q, k=10, e=None, weight=None):
        """The search step on encoded queries: per row of the raw query embeddings q [Q, D] (fused with the
        English embeddings e when given), the k best (gallery column, score) pairs, best first."""
        k = max(1, min(int(k), len(self.video_ids)))
        w = self.weight if weight is None else weight
        if self.faiss is not None:
            return self._faiss_rank(q, k, e, w)
        if self.low is not None:
            return self._two_stage_rank(q, k, e, w)
        return [hits for _, block in self._score_blocks(q, e, w) for hits in topk_stable(block, k)]

    # ---- two-stage exact search (LowPrecisionGallery) ----
    def _exact(self, q_row, cand):
        """float64 exact scores of one float64 unit query against the gallery columns `cand`. A row-wise
        product and sum, so a score depends only on the two vectors (a matrix-vector product may round a row
        differently by its position): duplicate videos tie exactly and rank by gallery order."""
        return (unit64(self.video_emb[cand]) * q_row).sum(dim=1)

    def _low_blocks(self, q):
        step = max(1, self.block // max(1, len(self.video_ids)))
        for i0 in range(0, len(q), step):
            low, bound = self.low.scores(q[i0:i0 + step])
            yield i0, low, bound

    def _exact_range(self, q):
        """(lo, top) of the exact [Q, N] matrix as evaluation.norm_score computes them (lo = min, top =
        max(s - lo)), without that matrix: the minimum lies among the entries with low - B <= min(low + B),
        the maximum among those with low + B >= max(low - B); only those are scored exactly."""
        upper_min, lower_max = float('inf'), float('-inf')
        for _, low, bound in self._low_blocks(q):
            b = bound.to(low.device, torch.float64)[:, None]
            upper_min = min(upper_min, (low.double() + b).min().item())
            lower_max = max(lower_max, (low.double() - b).max().item())
        mins, maxs = [], []
        for i0, low, bound in self._low_blocks(q):
            b = bound.to(low.device, torch.float64)[:, None]
            for found, keep in ((mins, low.double() - b <= upper_min), (maxs, low.double() + b >= lower_max)):
                for i in torch.nonzero(keep.any(dim=1)).squeeze(1).tolist():
                    found.append(self._exact(q[i0 + i], torch.nonzero(keep[i]).squeeze(1).cpu()))
        lo = torch.cat(mins).min()
        return lo, (torch.cat(maxs) - lo).max()

    def _two_stage_rank(self, q, k, e, w):
        q = unit64(q)
        out, counts = [], []
        if e is None:
            for i0, low, bound in self._low_blocks(q):
                for i in range(len(low)):
                    hits, n = refine(low[i], bound[i], k, lambda c, r=q[i0 + i]: self._exact(r, c))
                    out.append(hits)
                    counts.append(n)
            self.last_candidates = counts
            return out
        e = unit64(e)
        # fused = w * f_e(S_e) + (1 - w) * f_q(S_q), f = identity (MLCMR) or (s - lo) / top (NRCCR, top > 0)
        if self.fusion_normalize:
            (lo_e, top_e), (lo_q, top_q) = self._exact_range(e), self._exact_range(q)
        else:
            lo_e = lo_q = 0.0
            top_e = top_q = 1.0
        div_e, div_q = (top_e if top_e > 0 else 1.0), (top_q if top_q > 0 else 1.0)
        norm = self.fusion_normalize

        def f(s, lo, top):
            s = s - lo
            return s / top if top > 0 else s
        # float64 slack for evaluating the fused low score (a few roundings of terms below 2 + |lo| over top)
        slack = 1e-12 * (1 + abs(w) * (2 + abs(float(lo_e))) / float(div_e)
                         + abs(1 - w) * (2 + abs(float(lo_q))) / float(div_q))
        for (i0, low_e, bound_e), (_, low_q, bound_q) in zip(self._low_blocks(e), self._low_blocks(q)):
            for i in range(len(low_e)):
                le, lq = low_e[i].double(), low_q[i].double()
                if norm:
                    fused_low = w * f(le, lo_e, top_e) + (1 - w) * f(lq, lo_q, top_q)
                else:
                    fused_low = w * le + (1 - w) * lq
                bound = (abs(w) * float(bound_e[i]) / float(div_e) + abs(1 - w) * float(bound_q[i]) / float(div_q)
                         + slack)

                def exact(c, re=e[i0 + i], rq=q[i0 + i]):
                    se, sq = self._exact(re, c), self._exact(rq, c)
                    if norm:
                        return w * f(se, lo_e, top_e) + (1 - w) * f(sq, lo_q, top_q)
                    return w * se + (1 - w) * sq
                hits, n = refine(fused_low, bound, k, exact)
                out.append(hits)
                counts.append(n)
        self.last_candidates = counts
        return out

    # ---- FAISS ----
    def _faiss_rank(self, q, k, e, w):
        q = evaluation.l2_normalize(q).numpy()
        if e is None:
            scores, ids = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), k)
            return [[(int(j), float(s)) for j, s in zip(ri, rs) if j >= 0] for ri, rs in zip(ids, scores)]
        e = evaluation.l2_normalize(e).numpy()
        m = max(k, min(self.candidates, len(self.video_ids)))
        _, ids_q = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), m)
        _, ids_e = self.faiss.search(np.ascontiguousarray(e, dtype=np.float32), m)
        video = self.unit32()
        out = []
        for i in range(len(q)):
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
    index = None
    if path and os.path.isfile(path):
        try:
            index = faiss.read_index(path)
        except RuntimeError:            # truncated or corrupt: built again below
            index = None
        if index is not None and (index.ntotal != len(video_emb) or index.d != video_emb.shape[1]):
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
            try:
                faiss.write_index(index, tmp)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
    if device.type == 'cuda' and hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    return index
