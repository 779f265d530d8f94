"""Benchmark of search: gallery indexing (videos/s) and query latency. Prints a table, returns rows; asserts nothing.

    python util/bench/search.py                 # 10k and 100k videos, exact and FAISS, bert-base text encoder (CPU)
    python util/bench/search.py --quick         # tiny sizes and encoder: seconds (the smoke test)
    python util/bench/search.py --device cuda
    python util/bench/search.py --part zero_shot  # only the search with no training (multilingual CLIP)

Everything is synthetic and offline. Gallery: random unit embeddings of the model's joint-space size (1536, the
papers' mapping size), so no gallery has to be encoded to time a search. Indexing: the NRCCR video side at the
papers' sizes (1024-d frames, 40-80 per video, batch 64) encoding a BigFile of random frames through
`evaluation.encode_videos`, as Searcher.from_checkpoint does. Queries: 8-16 random words of the toy vocabulary,
one at a time (interactive use), through an NRCCR model whose text encoder is a bert-base-sized BERT with random
weights built from a config.

Rows (name, value, unit, note):
  index_videos_per_s     gallery encoding throughput
  query_tokenise         one query: tokenise and collate (median)
  query_bert             one query: the BERT forward alone
  query_text_encoder     one query: the whole text side (BERT, attention, pooling, mapping: embed_texts)
  search_<index>_<N>     the search step alone on an encoded query (Searcher.rank: normalise, score, top-10;
                         'exact' is the searcher's default for that size: dense float64 up to 2^22 videos x
                         dims, else the two-stage bfloat16 pre-filter + float64 re-scoring; FAISS index.search)
  query_<index>_<N>      end to end: tokenise + encode + search, median and p95
  zero_shot_*            the same rows for search with no training (Searcher over the untrained multilingual CLIP
                         model, docs/search.md 'No training: multilingual CLIP'): a sentence-transformers text model
                         of clip-ViT-B-32-multilingual-v1's shape (DistilBERT 6 x 768, mean pooling, Dense 768 ->
                         512) with random weights, a gallery of random 512-d unit embeddings (needs
                         sentence-transformers; skipped with a line otherwise)
Targets (docs/search.md): 100k exact search step < 20 ms; end-to-end query < 100 ms with the bert-base encoder and
with the zero-shot text model.
--amp bf16 times the text side under bfloat16 autocast (scores change slightly; off by default);
--prefilter float16 times the float16 pre-filter (faster for one query at a time on CPU, slow for batches).
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import evaluation                                           # noqa: E402
import model as models                                      # noqa: E402
from basic.bigfile import BigFileWriter                     # noqa: E402
from basic import data_provider as dp                        # noqa: E402
from util.make_toy_data import build_vocab                  # noqa: E402
from basic.precision import autocast_factory                 # noqa: E402
from util.searcher import Searcher                          # noqa: E402

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FULL = dict(galleries=(10_000, 100_000), dim=1536, bert=BERT_BASE, queries=(3, 30), index_videos=256,
            frames=(40, 80), feat_dim=1024, model={}, k=10)
QUICK = dict(galleries=(1_000, 100_000), dim=48, bert=TINY_BERT, queries=(1, 5), index_videos=16,
             frames=(4, 8), feat_dim=32, model=dict(text_hidden_size=32, video_hidden_size=32, text_num_attention=4,
                                                     visual_num_attention=4), k=10)
# The zero-shot text model: clip-ViT-B-32-multilingual-v1's tower (DistilBERT) and CLIP ViT-B/32's 512 dims
DISTILBERT = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
ZERO_SHOT_FULL = dict(tower=DISTILBERT, clip_dim=512)
ZERO_SHOT_QUICK = dict(tower=dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64), clip_dim=16)
SEARCH_TARGET_MS, QUERY_TARGET_MS = 20.0, 100.0


def _percentiles(seconds):
    ms = np.asarray(seconds) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95))


def build_model(sizes, vocab_dir):
    """An NRCCR model in eval mode with a random BERT of `sizes` (vocabulary of vocab_dir) and mapping size dim."""
    from transformers import BertConfig
    vocab = build_vocab()
    with open(os.path.join(vocab_dir, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(vocab) + '\n')
    bert_config = BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **sizes['bert']).to_dict()
    cfg = models.model_config('nrccr', bert_config=bert_config, visual_feat_dim=sizes['feat_dim'],
                              mapping_dim=sizes['dim'], **sizes['model'])
    torch.manual_seed(0)
    return models.build_model(cfg).eval(), dp.build_tokenizer(vocab_dir, True), vocab


def bench_indexing(model, sizes, device, folder):
    """Videos/s of encoding a gallery of random frames with the model's video side."""
    rng = np.random.default_rng(0)
    lo, hi = sizes['frames']
    mapping = {}
    with BigFileWriter(os.path.join(folder, 'feat'), sizes['feat_dim']) as w:
        for v in range(sizes['index_videos']):
            names = [f'v{v}_{i}' for i in range(int(rng.integers(lo, hi + 1)))]
            w.add_rows(names, rng.standard_normal((len(names), sizes['feat_dim']), dtype=np.float32))
            mapping[f'v{v}'] = names
    store = dp.FrameStore(os.path.join(folder, 'feat'))
    dataset = dp.VideoDataset(list(mapping), store)
    evaluation.encode_videos(model, torch.utils.data.Subset(dataset, range(min(8, len(dataset)))), 8, device)
    start = time.perf_counter()
    evaluation.encode_videos(model, dataset, 64, device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return len(dataset) / (time.perf_counter() - start)


def random_queries(vocab, n, seed=0):
    words = [w for w in vocab if w.isalpha() and w.isascii() and not w.startswith('[')]
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(words, size=int(rng.integers(8, 17)))) for _ in range(n)]


def _timed(fn, warm, runs, device):
    times = []
    for i in range(warm + runs):
        start = time.perf_counter()
        fn(i)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= warm:
            times.append(time.perf_counter() - start)
    return times


def bench_text(model, tokenizer, vocab, sizes, device, amp='off'):
    """{part: seconds per query} of one query's text side: tokenise, BERT alone, the whole embed_texts."""
    autocast = autocast_factory(amp, device)
    warm, runs = sizes['queries']
    queries = random_queries(vocab, warm + runs, seed=1)
    streams = [dp.move_to(dp.collate_ids(dp.tokenize(tokenizer, [q])), device) for q in queries]

    def tokenise(i):
        dp.move_to(dp.collate_ids(dp.tokenize(tokenizer, [queries[i]])), device)

    @torch.inference_mode()
    def bert(i):
        with autocast():
            model.text_encoder.bert(input_ids=streams[i]['ids'], attention_mask=streams[i]['mask'].long())

    @torch.inference_mode()
    def encoder(i):
        with autocast():
            model.embed_texts({'query': streams[i]})
    return {name: _timed(fn, warm, runs, device)
            for name, fn in (('tokenise', tokenise), ('bert', bert), ('text_encoder', encoder))}


def bench_gallery(model, tokenizer, vocab, n, sizes, device, index, amp='off', prefilter='auto'):
    """(search step seconds, end-to-end seconds, searcher) per query for a gallery of n random embeddings."""
    gen = torch.Generator().manual_seed(n)
    emb = torch.randn(n, sizes['dim'], generator=gen)
    searcher = Searcher(model, tokenizer, [f'v{i}' for i in range(n)], emb, device=device, index=index, amp=amp,
                        prefilter=prefilter)
    del emb
    warm, runs = sizes['queries']
    queries = random_queries(vocab, warm + runs)
    q_emb = searcher.encode(queries)
    candidates = []

    def step(i):                  # the search step alone, on an already encoded query
        searcher.rank(q_emb[i:i + 1], sizes['k'])
        candidates.extend(searcher.last_candidates)

    def end_to_end(i):
        searcher.search([queries[i]], k=sizes['k'])

    return _timed(step, warm, runs, device), _timed(end_to_end, warm, runs, device), searcher, candidates


def build_zero_shot(tower, clip_dim, folder):
    """The zero-shot model over `clip_dim`-d features and its tokenizer: a sentence-transformers text model (a
    random DistilBERT of `tower` sizes with the toy vocabulary, mean pooling, Dense -> clip_dim) written to
    `folder` and loaded as search.py --text_model loads it."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Pooling, Transformer
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel
    from nets.common import quiet_transformers
    quiet_transformers()
    vocab = build_vocab()
    encoder_dir, st_dir = os.path.join(folder, 'distilbert'), os.path.join(folder, 'text_model')
    os.makedirs(encoder_dir, exist_ok=True)
    with open(os.path.join(encoder_dir, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(vocab) + '\n')
    BertTokenizerFast(os.path.join(encoder_dir, 'vocab.txt')).save_pretrained(encoder_dir)
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=len(vocab), **tower)).save_pretrained(encoder_dir)
    transformer = Transformer(encoder_dir, max_seq_length=128)
    SentenceTransformer(modules=[transformer, Pooling(tower['dim'], 'mean'),
                                 Dense(tower['dim'], clip_dim, activation_function=torch.nn.Identity())],
                        device='cpu').save(st_dir)
    logging.getLogger("nets.mclip").setLevel(logging.ERROR)     # random features: no CLIP to check against
    model = models.zero_shot_model(st_dir, None, clip_dim).eval()
    return model, type(model).build_tokenizer({'bert_name': st_dir}), vocab


def gallery_rows(prefix, model, tokenizer, vocab, sizes, device, indexes, amp, prefilter, quick, log):
    """Rows of the search step and the end-to-end query for each index and gallery size."""
    rows = []
    for index in indexes:
        if index == 'faiss':
            try:
                import faiss  # noqa: F401
            except ImportError:
                log('faiss: not installed (pip install faiss-cpu), skipped')
                continue
        for n in sizes['galleries']:
            step, e2e, searcher, cands = bench_gallery(model, tokenizer, vocab, n, sizes, device, index, amp,
                                                       prefilter)
            how = (f'FAISS {searcher.faiss.__class__.__name__}' if searcher.faiss is not None else
                   f'{searcher.scoring}' + (f' {str(searcher.low.dtype)[6:]}, median {int(np.median(cands))} '
                                            'candidates' if searcher.low is not None else ' float64'))
            del searcher
            for kind, times, target in (('search', step, SEARCH_TARGET_MS), ('query', e2e, QUERY_TARGET_MS)):
                med, p95 = _percentiles(times)
                note = f'p95 {p95:.2f} ms, {len(times)} queries, dim {sizes["dim"]}, {how}'
                if not quick and (kind == 'query' or index == 'exact') and n == max(sizes['galleries']):
                    note += f', target < {target:g} ms'
                rows.append((f'{prefix}{kind}_{index}_{n}', med, 'ms median', note))
                log(f'{rows[-1][0]:<24} {med:10.2f} {rows[-1][2]:<9} {note}')
    return rows


def run_zero_shot(quick=False, device='cpu', indexes=('exact', 'faiss'), threads=None, amp='off', prefilter='auto',
                  log=print):
    """Rows [(name, value, unit, note)] of search with no training: the text side (tokenise = the
    sentence-transformers preprocessing, the whole text model) and the search step and end-to-end query at
    each gallery size; [] with a line when sentence-transformers is not installed."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        log('zero-shot: sentence-transformers not installed (pip install sentence-transformers), skipped')
        return []
    sizes = QUICK if quick else FULL
    zs = ZERO_SHOT_QUICK if quick else ZERO_SHOT_FULL
    sizes = dict(sizes, dim=zs['clip_dim'])
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, vocab = build_zero_shot(zs['tower'], zs['clip_dim'], folder)
        model.to(device)
        autocast = autocast_factory(amp, device)
        warm, runs = sizes['queries']
        queries = random_queries(vocab, warm + runs, seed=1)

        def tokenise(i):
            dp.move_to(dp.collate_ids(dp.tokenize(tokenizer, [queries[i]])), device)

        @torch.inference_mode()
        def encoder(i):
            with autocast():
                model.embed_texts({'query': dp.move_to(dp.collate_ids(dp.tokenize(tokenizer, [queries[i]])), device)})
        tower = 'DistilBERT 6 x 768' if not quick else 'tiny DistilBERT'
        for part, fn in (('tokenise', tokenise), ('text_encoder', encoder)):
            med, p95 = _percentiles(_timed(fn, warm, runs, device))
            rows.append((f'zero_shot_query_{part}', med, 'ms median', f'p95 {p95:.2f} ms, {tower}, amp {amp}'))
            log(f'{rows[-1][0]:<24} {med:10.2f} {rows[-1][2]:<9} {rows[-1][3]}')
        rows += gallery_rows('zero_shot_', model, tokenizer, vocab, sizes, device, indexes, amp, prefilter, quick,
                             log)
    return rows


def run(quick=False, device='cpu', indexes=('exact', 'faiss'), threads=None, amp='off', prefilter='auto', log=print):
    """Rows [(name, value, unit, note)] of the search benchmark; also printed through `log`."""
    sizes = QUICK if quick else FULL
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, vocab = build_model(sizes, folder)
        model.to(device)
        with torch.inference_mode():
            vps = bench_indexing(model, sizes, device, folder)
        rows.append(('index_videos_per_s', vps, 'videos/s',
                     f'NRCCR video side, {sizes["feat_dim"]}-d frames, {sizes["frames"][0]}-{sizes["frames"][1]} '
                     f'per video, batch 64'))
        log(f'{rows[-1][0]:<24} {vps:10.1f} {rows[-1][2]:<9} {rows[-1][3]}')
        bert = 'bert-base' if sizes['bert'] is BERT_BASE else 'tiny BERT'
        for part, times in bench_text(model, tokenizer, vocab, sizes, device, amp).items():
            med, p95 = _percentiles(times)
            rows.append((f'query_{part}', med, 'ms median', f'p95 {p95:.2f} ms, {bert}, amp {amp}'))
            log(f'{rows[-1][0]:<24} {med:10.2f} {rows[-1][2]:<9} {rows[-1][3]}')
        rows += gallery_rows('', model, tokenizer, vocab, sizes, device, indexes, amp, prefilter, quick, log)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes and encoder (seconds)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--index', default='exact,faiss', help='comma-separated: exact, faiss')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    p.add_argument('--amp', default='off', choices=['off', 'bf16', 'fp16'],
                   help='autocast for the text side (default off: the tester\'s embeddings)')
    p.add_argument('--prefilter', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help='two-stage pre-filter type (auto: bfloat16 on CPU, float32 on CUDA)')
    p.add_argument('--part', default='trained,zero_shot',
                   help='comma-separated: trained (a checkpoint\'s model), zero_shot (no training) (default both)')
    args = p.parse_args(argv)
    parts = set(args.part.split(','))
    options = (args.quick, args.device, tuple(args.index.split(',')), args.threads, args.amp, args.prefilter)
    return ((run(*options) if 'trained' in parts else [])
            + (run_zero_shot(*options) if 'zero_shot' in parts else []))


if __name__ == '__main__':
    main()
