"""Benchmark of the search page under load: query latency (p50 / p95) and errors with concurrent clients on
loopback. Prints a table, returns rows; asserts nothing.

    python util/bench/page.py                   # 10k videos, 8 clients, bert-base-sized text encoder (CPU)
    python util/bench/page.py --quick           # tiny sizes: seconds (the smoke test)
    python util/bench/page.py --clients 16 --device cuda

The server is util/search_page.PageServer on 127.0.0.1 (a free port) over a Searcher of random embeddings, as
util/bench/search.py builds it (1536-d gallery, an NRCCR model whose text encoder is a bert-base-sized BERT
with random weights; --quick: tiny ones). Each client is a thread with one keep-alive HTTP connection sending
GET /api/search?q=<8-16 random words>&k=10, one request after the other; all clients start together, and the
run stops after `queries_per_client` each or `max_seconds`. Latency: from sending a request to having read its
whole answer, in the client (HTTP, JSON, waiting and the search itself). The server runs one search at a time
(the model and tokenizer are shared), so with N clients a query waits for up to N - 1 others: the one-client
rows show the latency without waiting.

Rows (name, value, unit, note):
  page_query_single_p50/p95   one client
  page_query_p50/p95          `clients` concurrent clients
  page_queries_per_s          answers per second under that load
  page_queries                answered
  page_errors                 answers other than 200 OK, and requests that failed (must be 0)
"""
import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
import urllib.parse

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from util.bench import search as bench_search              # noqa: E402
from util.search_page import PageServer                     # noqa: E402
from util.searcher import Searcher                          # noqa: E402

FULL = dict(bench_search.FULL, videos=10_000, clients=8, queries_per_client=25, single=20, max_seconds=300)
QUICK = dict(bench_search.QUICK, videos=1_000, clients=4, queries_per_client=3, single=3, max_seconds=60)


def client(port, queries, k, deadline, latencies, errors):
    """Send `queries` one after the other on one keep-alive connection; append seconds and error texts."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    for q in queries:
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            conn.request('GET', '/api/search?' + urllib.parse.urlencode({'q': q, 'k': k}))
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                errors.append(f'{r.status} {body[:100]!r}')
                continue
            latencies.append(time.perf_counter() - start)
        except (OSError, http.client.HTTPException) as e:
            errors.append(f'{type(e).__name__}: {e}')
            conn.close()
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    conn.close()


def load(port, clients, per_client, queries, k, max_seconds):
    """(latencies, errors, wall seconds) of `clients` concurrent clients sending `per_client` queries each."""
    latencies, errors = [], []
    deadline = time.monotonic() + max_seconds
    threads = [threading.Thread(target=client, args=(port, queries[i::clients][:per_client], k, deadline, latencies,
                                                     errors)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def run(quick=False, device='cpu', clients=None, threads=None, log=print):
    """Rows [(name, value, unit, note)] of the page's load benchmark; also printed through `log`."""
    sizes = QUICK if quick else FULL
    clients = clients or sizes['clients']
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    rows = []

    def row(name, value, unit, note):
        rows.append((name, value, unit, note))
        log(f'{name:<24} {value:10.2f} {unit:<9} {note}')

    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, vocab = bench_search.build_model(sizes, folder)
        model.to(device)
        n = sizes['videos']
        emb = torch.randn(n, sizes['dim'], generator=torch.Generator().manual_seed(n))
        searcher = Searcher(model, tokenizer, [f'v{i}' for i in range(n)], emb, device=device)
        server = PageServer(lambda say: {'videos': searcher}, log=lambda line: None).start().wait_ready()
        try:
            per_client = sizes['queries_per_client']
            queries = bench_search.random_queries(vocab, clients * per_client + sizes['single'] + 2)
            load(server.port, 1, 2, queries[-2:], sizes['k'], sizes['max_seconds'])                  # warm up
            what = (f'{n:,} videos x {sizes["dim"]}, {searcher.scoring} search, '
                    f'{"bert-base" if sizes["bert"] is bench_search.BERT_BASE else "tiny BERT"}, k {sizes["k"]}')
            single, single_errors, _ = load(server.port, 1, sizes['single'], queries[-2 - sizes['single']:-2],
                                            sizes['k'], sizes['max_seconds'])
            p50, p95 = bench_search._percentiles(single) if single else (float('nan'),) * 2
            row('page_query_single_p50', p50, 'ms', f'one client, {len(single)} queries, {what}')
            row('page_query_single_p95', p95, 'ms', 'one client')
            latencies, errors, wall = load(server.port, clients, per_client, queries, sizes['k'], sizes['max_seconds'])
            errors += single_errors
            p50, p95 = bench_search._percentiles(latencies) if latencies else (float('nan'),) * 2
            row('page_query_p50', p50, 'ms', f'{clients} concurrent clients, loopback HTTP, {what}')
            row('page_query_p95', p95, 'ms', f'{clients} concurrent clients')
            row('page_queries_per_s', len(latencies) / wall, 'queries/s', f'{clients} concurrent clients')
            row('page_queries', len(latencies), 'answered', f'of {clients} x {per_client} (stops after '
                                                            f'{sizes["max_seconds"]} s)')
            row('page_errors', len(errors), 'errors', '; '.join(sorted(set(errors)))[:200] or 'none (must be 0)')
        finally:
            server.stop()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes and encoder (seconds)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--clients', type=int, default=None, help='concurrent clients (8)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    args = p.parse_args(argv)
    if args.clients is not None and args.clients < 1:
        p.error('--clients must be >= 1')
    return run(args.quick, args.device, args.clients, args.threads)


if __name__ == '__main__':
    main()
