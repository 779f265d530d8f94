"""Search the videos of a feature folder by text, with a trained checkpoint or with no training (docs/search.md).

With no training (--text_model) a multilingual CLIP text model searches CLIP features directly.

    python search.py --checkpoint RUN_DIR --query "一只狗在冲浪" --query "a dog surfing"
    python search.py --text_model sentence-transformers/clip-ViT-B-32-multilingual-v1 \\
        --feature_dir path/to/FeatureData/clip_vit_b32 --query "一只狗在冲浪"               # no training
    python search.py --checkpoint RUN_DIR --rootpath ~/VisualSearch --collection mine --feature clip_b32 \\
        --queries_file queries.txt --json
    python search.py --checkpoint RUN_DIR --feature_dir path/to/FeatureData/clip_b32      # then type queries
    python search.py --checkpoint RUN_DIR --moments 4:2 --query "a dog surfing"           # moments in videos
    python search.py --checkpoint RUN_DIR --serve --moments 4:2        # the search page on http://127.0.0.1:8000/

Queries come from --query (repeatable), --queries_file (one per line; `-` = stdin; `query<TAB>english` adds an
English text to fuse with the query) or, when neither is given, an interactive prompt (`query || english`).
--second (repeatable, one per --query) gives the English texts on the command line. The gallery is every video
of the feature folder (or of --split's caption files), encoded once and cached beside the run; rules for
tokenising, fusing and ranking, and when the ranking equals the tester's, are in util/searcher.py.
--moments WINDOW_S[:STRIDE_S] ranks windows of consecutive frames inside the videos instead (basic/media.py).
--serve serves a web page and a JSON API over the same gallery instead of printing (util/search_page.py).
"""
import argparse
import json
import logging
import sys

from basic.errors import DataError
from basic import media, runs
from basic.precision import AMP_CHOICES, resolve_amp
from util.searcher import CLEAN_RULES, PREFILTER_DTYPES, SCORING, Searcher

logger = logging.getLogger('mlcmr')


def get_args_parser():
    p = argparse.ArgumentParser('MLCMR search', add_help=False)
    g = p.add_argument_group('Model and gallery')
    g.add_argument('--checkpoint', default=None,
                   help='checkpoint file, run folder, or a folder with exactly one model_best.pth.tar below')
    g.add_argument('--text_model', default=None,
                   help='instead of --checkpoint, no training: a multilingual CLIP text model (sentence-transformers '
                        'folder or hub id, e.g. sentence-transformers/clip-ViT-B-32-multilingual-v1 for features of '
                        'openai/clip-vit-base-patch32) or a CLIP model (English); needs pip install '
                        'sentence-transformers for the former')
    g.add_argument('--rootpath', default=None, help='VisualSearch root (default: the run\'s, else ~/VisualSearch)')
    g.add_argument('--collection', default=None, help='collection holding the videos (default: the run\'s)')
    g.add_argument('--feature', default=None, help='feature folder name under FeatureData (default: the run\'s)')
    g.add_argument('--feature_dir', default=None, help='explicit feature folder (overrides the three above)')
    g.add_argument('--split', default=None,
                   help='gallery = the videos of this split\'s caption files (e.g. test), as the tester reads them')
    g.add_argument('--bert_name', default=None, help='tokenizer folder or hub id (default: the checkpoint\'s)')
    g.add_argument('--data_type', default='google_enc2zh',
                   help='--text_model with --split: the NRCCR caption files of the split (google_enc2zh)')
    g.add_argument('--frame_sampling', default='uniform', choices=['first', 'uniform'],
                   help='--text_model: videos over 64 frames are read as 64 spread over the video (uniform, '
                        'default) or as their first 64; a checkpoint uses its own')
    g = p.add_argument_group('Queries')
    g.add_argument('--query', '-q', action='append', default=[], help='a query (repeatable), any language')
    g.add_argument('--second', action='append', default=[],
                   help='English text fused with the --query at the same position (repeatable)')
    g.add_argument('--queries_file', default=None,
                   help='one query per line (UTF-8), optionally "query<TAB>english"; "-" reads stdin')
    g.add_argument('--interactive', type=int, default=None, choices=[0, 1],
                   help='1: prompt for queries (default when no --query/--queries_file is given)')
    g.add_argument('--clean', default='raw', choices=CLEAN_RULES,
                   help='query text rule: raw (as typed, default), en (English caption cleaning), auto (clean '
                        'ASCII-only queries); the English --second text is always cleaned')
    g.add_argument('--weight', type=float, default=None,
                   help='fusion weight on the English text (default: NRCCR sim_ratio 0.2, MLCMR the tester\'s)')
    g = p.add_argument_group('Search and output')
    g.add_argument('-k', '--top_k', type=int, default=10, help='results per query (10)')
    g.add_argument('--index', default='exact', choices=['exact', 'faiss'],
                   help='exact matrix product (default) or a FAISS inner-product index (pip install faiss-cpu)')
    g.add_argument('--faiss_index', default='Flat',
                   help='FAISS index factory: Flat (exact), IVF1024,Flat or HNSW32 (approximate, for millions)')
    g.add_argument('--scoring', default='auto', choices=SCORING,
                   help='exact search: dense (float64 gallery, the tester\'s arithmetic), two-stage (bfloat16 '
                        'pre-filter with an error bound, float64 re-scoring: the same top-k, less memory traffic) '
                        'or auto (dense for --split and up to 2^22 videos x dims)')
    g.add_argument('--prefilter', default='auto', choices=['auto', *PREFILTER_DTYPES],
                   help='two-stage pre-filter type (auto: bfloat16 on CPU, float32 on CUDA)')
    g.add_argument('--json', action='store_true', help='print JSON instead of tables')
    g.add_argument('--moments', default=None, metavar='WINDOW_S[:STRIDE_S]',
                   help='rank windows of WINDOW_S seconds every STRIDE_S seconds (default half the window) inside '
                        'each video, each encoded as a short video, instead of whole videos (needs the frame '
                        'times util/extract_features.py records); with --serve the page offers both')
    g = p.add_argument_group('Page (--serve)')
    g.add_argument('--serve', action='store_true',
                   help='serve a search page and a JSON API (/api/search?q=...&k=...) instead of printing results '
                        '(pip install starlette uvicorn)')
    g.add_argument('--host', default='127.0.0.1',
                   help='address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)')
    g.add_argument('--port', type=int, default=8000, help='port (8000; 0: any free port, printed at start)')
    g.add_argument('--videos', default=None,
                   help='folder of the original video files, played from the matched moment (default: the folder '
                        'util/extract_features.py recorded beside the features)')
    g.add_argument('--thumbnails', default=None,
                   help='thumbnail folder (default: <feature folder>/thumbnails, from extract_features.py '
                        '--thumbnails 1)')
    g = p.add_argument_group('Run')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--batch_size', type=int, default=None, help='encoding batch (default: the tester\'s 64 / 16)')
    g.add_argument('--workers', type=int, default=0, help='data-loading processes for encoding the gallery (0)')
    g.add_argument('--amp', default='off', choices=AMP_CHOICES,
                   help='autocast for encoding queries: off (fp32, default; the tester\'s embeddings), bf16, fp16, '
                        'auto (bf16 where native); changes scores slightly')
    g.add_argument('--threads', type=int, default=None, help='CPU threads for torch (default: torch\'s choice)')
    g.add_argument('--cache', type=int, default=1, choices=[0, 1], help='cache the encoded gallery (1)')
    g.add_argument('--cache_dir', default=None, help='gallery cache folder (default <checkpoint folder>/search_cache)')
    return p


# ============ steps ============

def check_flags(args):
    """Values no search can use stop the command with one line (before the model is loaded)."""
    if (args.checkpoint is None) == (args.text_model is None):
        raise DataError('give --checkpoint RUN_DIR (a trained model) or --text_model NAME (no training), one of them')
    if args.top_k < 1:
        raise DataError(f'-k {args.top_k}: the number of results per query must be at least 1')
    if args.weight is not None and not 0.0 <= args.weight <= 1.0:
        raise DataError(f'--weight {args.weight:g}: the fusion weight on the English text must be in [0, 1] '
                        '(0: the query alone, 1: the English text alone)')
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f'--batch_size {args.batch_size}: must be at least 1')
    empty = [i for i, q in enumerate(args.query, 1) if not q.strip()]
    if empty:
        raise DataError(f'--query number {empty[0]} is empty; give a text to search for')


def read_queries(args):
    """[(query, english or None)] from --query/--second and --queries_file."""
    if args.second and len(args.second) != len(args.query):
        raise DataError(f'{len(args.second)} --second texts for {len(args.query)} --query; give one per query')
    pairs = list(zip(args.query, args.second or [None] * len(args.query)))
    if args.queries_file:
        source = '<stdin>' if args.queries_file == '-' else args.queries_file
        try:
            if args.queries_file == '-':
                text = sys.stdin.read()
            else:
                with open(args.queries_file, encoding='utf-8-sig') as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f'{source}: cannot read queries ({e}); one UTF-8 query per line') from None
        before = len(pairs)
        for line_no, line in enumerate(text.split('\n'), 1):
            line = line.strip('\r\n')
            if line.strip():
                query, _, english = line.partition('\t')
                if not query.strip():
                    raise DataError(f'{source}:{line_no}: the query before the tab is empty; one query per line, '
                                    'optionally "query<TAB>english"')
                pairs.append((query.strip(), english.strip() or None))
        if len(pairs) == before:
            raise DataError(f'{source}: no queries (the file is empty or blank); one query per line')
    return pairs


def run_queries(searcher, pairs, k):
    """Search pairs in one call when every query has an English text or none has, else query by query."""
    with_second = [p for p in pairs if p[1]]
    if not with_second or len(with_second) == len(pairs):
        return searcher.search([q for q, _ in pairs], k, second=[e for _, e in pairs] if with_second else None)
    return [r for q, e in pairs for r in searcher.search([q], k, second=[e] if e else None)]


def format_results(results):
    blocks = []
    for i, r in enumerate(results, 1):
        head = f'query {i}: {r.query}' + (f'   (+ English: {r.second})' if r.second else '')
        width = max([len('video id')] + [len(h.video_id) for h in r.hits])
        timed = any(h.start is not None for h in r.hits)
        lines = [head, f'{"rank":>4}  {"video id":<{width}}  {"score":>8}' + ('  time' if timed else '')]
        lines += [f'{h.rank:>4}  {h.video_id:<{width}}  {h.score:>8.4f}' + (f'  {format_span(h)}' if timed else '')
                  for h in r.hits]
        blocks.append('\n'.join(lines))
    return '\n\n'.join(blocks)


def emit(results, as_json):
    if as_json:
        print(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=1))
    else:
        print(format_results(results))


def format_span(hit):
    """'m:ss.s-m:ss.s' of a hit's time range; '' when unknown."""
    if hit.start is None:
        return ''
    clock = lambda t: f'{int(t // 60)}:{t % 60:04.1f}'           # noqa: E731
    return f'{clock(hit.start)}-{clock(hit.end) if hit.end is not None else "end"}'


def interactive(searcher, k, as_json):
    searcher.encode(['warm up'])          # the first forward pass initialises kernels: not the user's query
    print('type a query (optionally "query || English text"); an empty line or Ctrl-D ends', file=sys.stderr)
    while True:
        try:
            line = input('query> ')
        except EOFError:
            break
        if not line.strip():
            break
        query, _, english = line.partition('||')
        emit(run_queries(searcher, [(query.strip(), english.strip() or None)], k), as_json)


def open_searcher(args, device, amp, moments=None, log=None):
    """The Searcher of a checkpoint (--checkpoint) or, with no training, of a text model (--text_model)."""
    common = dict(feature_dir=args.feature_dir, split=args.split, device=device, batch_size=args.batch_size,
                  workers=args.workers, cache=bool(args.cache), cache_dir=args.cache_dir, index=args.index,
                  faiss_index=args.faiss_index, weight=args.weight, clean=args.clean, scoring=args.scoring,
                  prefilter=args.prefilter, amp=amp, moments=moments, log=log)
    if args.text_model is not None:
        return Searcher.zero_shot(args.text_model, args.rootpath, args.collection, args.feature,
                                  data_type=args.data_type, frame_sampling=args.frame_sampling, **common)
    return Searcher.from_checkpoint(args.checkpoint, args.rootpath, args.collection, args.feature,
                                    bert_name=args.bert_name, **common)


# ============ moments and the page ============

def read_moments(args):
    """(window, stride) seconds of --moments, or None."""
    if args.moments is None:
        return None
    try:
        return media.parse_moments(args.moments)
    except ValueError as e:
        raise DataError(f'--{e}') from None


def serve(args, pairs, device, amp, moments):
    """--serve: the page over the gallery (and its windows with --moments), built once the server listens
    (docs/search.md, 'The search page')."""
    if pairs or args.interactive:
        raise DataError('--serve takes its queries from the page; drop --query, --queries_file and --interactive')
    from util import search_page

    def build(log):
        videos = open_searcher(args, device, amp, log=log)
        videos.encode(['warm up'])       # the first forward pass initialises kernels: not the first user's query
        return {'videos': videos, **({'moments': videos.for_moments(moments, log)} if moments else {})}

    server = search_page.PageServer(build, args.host, args.port, args.videos, args.thumbnails)
    server.run()
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    return runs.run_cli(_main, args)


def _main(args):
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
    from basic import distributed as dist
    check_flags(args)
    pairs = read_queries(args)
    try:
        device = dist.resolve_device(args.device)
    except ValueError as e:
        raise DataError(str(e)) from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    amp, message = resolve_amp(args.amp, device)
    if amp != 'off':
        print(message, file=sys.stderr)
    moments = read_moments(args)
    if args.serve:
        return serve(args, pairs, device, amp, moments)
    searcher = open_searcher(args, device, amp, moments, log=lambda m: print(m, file=sys.stderr))
    results = []
    if pairs:
        results = run_queries(searcher, pairs, args.top_k)
        emit(results, args.json)
    if args.interactive or (args.interactive is None and not pairs):
        interactive(searcher, args.top_k, args.json)
    return results


if __name__ == '__main__':
    main()
