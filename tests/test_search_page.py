"""The search page (util/search_page.py, search.py --serve): the API and its JSON, what it serves and what it
refuses (paths outside its folders, malformed requests), progress while the gallery is built, slow and broken
clients, moments, the load benchmark, and the page in a real browser over the demo videos."""
import builtins
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip('starlette', reason='the search page needs starlette and uvicorn (requirements-optional.txt)')
pytest.importorskip('uvicorn', reason='the search page needs starlette and uvicorn (requirements-optional.txt)')

import search                                                       # noqa: E402
from basic import progress                                          # noqa: E402
from basic.errors import DataError                                  # noqa: E402
from conftest import REPO                                           # noqa: E402
from util import search_page                                        # noqa: E402
from util.searcher import Hit, Result                               # noqa: E402


# ============ a server over a stub searcher ============

class StubSearcher:
    """search() as the Searcher's: rank i is video i, score 1 / rank. 'slow' waits for `release`; 'boom' fails."""

    def __init__(self, video_ids):
        self.video_ids = list(video_ids)
        self.release, self.started, self.calls = threading.Event(), threading.Event(), []

    def search(self, queries, k=10, second=None):
        self.calls.append((queries, k, second))
        if queries[0] == 'slow':
            self.started.set()
            assert self.release.wait(30)
        if queries[0] == 'boom':
            raise RuntimeError('a bug\nwith a second line')
        return [Result(q, None if second is None else second[i],
                       [Hit(r + 1, v, 1.0 / (r + 1), 1.0 * r, None) for r, v in enumerate(self.video_ids[:k])])
                for i, q in enumerate(queries)]


@pytest.fixture()
def folders(tmp_path):
    """videos/ (a, b, a symlink to a file outside, a symlink to b), thumbnails/, and secret/ outside both."""
    from PIL import Image
    secret = tmp_path / 'secret'
    secret.mkdir()
    (secret / 'passwd').write_bytes(b'SECRET-CONTENT')
    (secret / 'evil.mp4').write_bytes(b'SECRET-CONTENT')
    videos, thumbs = tmp_path / 'videos', tmp_path / 'thumbnails'
    videos.mkdir()
    thumbs.mkdir()
    (videos / 'a.mp4').write_bytes(b'A' * 1000)
    (videos / 'b.webm').write_bytes(b'B' * 10)
    os.symlink(secret / 'evil.mp4', videos / 'evil.mp4')
    os.symlink(videos / 'b.webm', videos / 'alias.mp4')
    os.symlink(secret / 'passwd', thumbs / 'evil.jpg')
    Image.new('RGB', (8, 8), (200, 0, 0)).save(thumbs / 'a.jpg')
    return {'root': tmp_path, 'videos': str(videos), 'thumbs': str(thumbs), 'secret': str(secret)}


@pytest.fixture()
def stub_server(folders):
    stub = StubSearcher(['a', 'b', 'evil', 'alias', '..', 'c'])
    server = search_page.PageServer(lambda log: {'videos': stub}, video_dir=folders['videos'],
                                    thumb_dir=folders['thumbs'], log=lambda line: None).start().wait_ready()
    yield server, stub
    stub.release.set()
    server.stop()


def get(server, path, headers=None, timeout=10):
    """(status, headers, body) of GET `path`, sent byte for byte (http.client does not normalise it)."""
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=timeout)
    try:
        conn.request('GET', path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def test_binds_loopback_by_default():
    assert search.get_args_parser().parse_args(['--checkpoint', 'x']).host == '127.0.0.1'
    server = search_page.PageServer(lambda log: {}, port=0, log=lambda line: None)
    try:
        assert server.sock.getsockname()[0] == '127.0.0.1' and server.url == f'http://127.0.0.1:{server.port}/'
    finally:
        server.sock.close()


def test_api_search_returns_the_searchers_results(stub_server):
    server, stub = stub_server
    status, headers, body = get(server, '/api/search?q=%E7%BA%A2%E8%89%B2&k=3&second=red')
    assert status == 200 and headers['content-type'] == 'application/json'
    assert json.loads(body) == [r.to_dict() for r in stub.search(['红色'], 3, second=['red'])]
    assert stub.calls[0] == (['红色'], 3, ['red'])
    status, _, body = get(server, '/api/search?q=+a+dog+')          # k defaults to 10, the query is stripped
    assert status == 200 and stub.calls[-1] == (['a dog'], 10, None) and len(json.loads(body)[0]['hits']) == 6
    status, headers, body = get(server, '/?q=red&k=3')
    assert status == 200 and headers['content-type'].startswith('text/html') and b'id="q"' in body
    status, _, body = get(server, '/api/status')
    info = json.loads(body)
    assert status == 200 and info['state'] == 'ready' and info['galleries'] == {'videos': {'items': 6, 'moments': None}}
    assert info['media']['video_files'] == 4 and info['media']['thumbnails'] is True


BAD = [
    ('/api/search', 400, 'q: missing'),
    ('/api/search?q=', 400, 'q: missing or empty'),
    ('/api/search?q=+++', 400, 'q: missing or empty'),
    ('/api/search?q=' + 'x' * (search_page.MAX_QUERY_CHARS + 1), 400, 'at most 500'),
    ('/api/search?q=red&second=' + 'y' * 501, 400, 'second: 501 characters'),
    ('/api/search?q=red%00', 400, 'control characters'),
    ('/api/search?q=red&k=abc', 400, "k: 'abc' is not a whole number"),
    ('/api/search?q=red&k=0', 400, 'k: 0 is out of range'),
    ('/api/search?q=red&k=-3', 400, 'out of range'),
    ('/api/search?q=red&k=101', 400, 'out of range'),
    ('/api/search?q=red&k=99999999999999999999999', 400, 'out of range'),
    ('/api/search?q=red&q=blue', 400, 'q: given 2 times'),
    ('/api/search?q=red&moments=4:2', 400, 'no moments gallery'),
    ('/api/search?q=red&moments=oops', 400, 'expected WINDOW_S'),
    ('/thumb/a?t=soon', 400, "t: 'soon' is not a number"),
    ('/nowhere', 404, 'not found: /nowhere'),
    ('/api/search/extra', 404, 'not found'),
]


@pytest.mark.parametrize('path,status,message', BAD)
def test_malformed_requests_get_a_one_line_4xx(stub_server, path, status, message):
    server, stub = stub_server
    got, headers, body = get(server, path)
    text = body.decode()
    if path.startswith('/api/'):
        text = json.loads(body)['error']
    assert got == status and message in text, (got, text)
    assert '\n' not in text.strip() and 'Traceback' not in text
    assert stub.calls == []


def test_wrong_method_and_a_failing_search_are_one_line(stub_server):
    server, _ = stub_server
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    conn.request('POST', '/api/search?q=red', body=b'{}')
    r = conn.getresponse()
    assert r.status == 405 and json.loads(r.read())['error'] == 'POST is not allowed here; use GET'
    conn.close()
    status, _, body = get(server, '/api/search?q=boom')
    assert status == 500 and json.loads(body) == {'error': "internal error (RuntimeError); the server's terminal has "
                                                           'the details'}
    assert get(server, '/api/search?q=red')[0] == 200                # and it goes on serving


TRAVERSALS = ['/video/../secret/passwd', '/video/..%2F..%2Fsecret%2Fpasswd', '/video/%2E%2E%2Fsecret%2Fpasswd',
              '/video/..%2fsecret%2fpasswd', '/video//etc/passwd', '/video/%2Fetc%2Fpasswd',
              '/video/' + '%2F'.join(['..'] * 8) + '%2Fetc%2Fpasswd', '/video/..', '/video/%2E%2E',
              '/video/evil', '/video/evil.mp4', '/video/missing', '/video/c', '/video/a.mp4',
              '/thumb/evil', '/thumb/..', '/thumb/..%2Fsecret%2Fpasswd', '/thumb/%2Fetc%2Fpasswd',
              '/thumb/b', '/thumb/missing', '/video/a%00', '/..%2F..%2Fsecret%2Fpasswd',
              '/static/../../secret/passwd']


def test_nothing_outside_the_folders_is_served_or_read(stub_server, folders, monkeypatch):
    """../, absolute paths, encoded slashes, a symlink out of the folder, ids not in the gallery: 404, and no
    file outside the video and thumbnail folders is opened or even stat'ed."""
    server, _ = stub_server
    touched = []
    real_open, real_stat = builtins.open, os.stat

    def spy_open(file, *a, **k):
        touched.append(str(file))
        return real_open(file, *a, **k)

    def spy_stat(path, *a, **k):
        touched.append(str(path))
        return real_stat(path, *a, **k)
    monkeypatch.setattr(builtins, 'open', spy_open)
    monkeypatch.setattr(os, 'stat', spy_stat)
    for path in TRAVERSALS:
        status, _, body = get(server, path)
        assert status == 404 and b'SECRET' not in body, (path, status, body[:80])
        assert b'\n' not in body.strip()
    secret = os.path.realpath(folders['secret'])
    assert not [p for p in touched if os.path.realpath(p).startswith(secret) or p.startswith('/etc')]
    # what is inside is served: a video with HTTP ranges, a symlink within the folder, a thumbnail
    status, headers, body = get(server, '/video/a', headers={'Range': 'bytes=10-19'})
    assert status == 206 and body == b'A' * 10 and headers['content-range'] == 'bytes 10-19/1000'
    assert get(server, '/video/alias')[2] == b'B' * 10 and get(server, '/video/b')[2] == b'B' * 10
    status, headers, body = get(server, '/thumb/a?t=1.5')
    assert status == 200 and headers['content-type'] == 'image/jpeg' and body[:2] == b'\xff\xd8'
    assert any(p.endswith(os.path.join('videos', 'a.mp4')) for p in touched)       # the spies do see the reads


def test_slow_and_broken_clients_do_not_block_others(stub_server, folders):
    server, stub = stub_server
    big = os.path.join(folders['videos'], 'c.mp4')
    with open(big, 'wb') as f:
        f.write(b'C' * (32 << 20))
    server.state.media = search_page.Media(stub.video_ids, folders['videos'], folders['thumbs'])
    hanging = []
    for raw in (b'GET /api/status HTTP/1.1\r\nHost: x\r\n',                     # headers never finished
                b'',                                                            # connects, says nothing
                b'GET /video/c HTTP/1.1\r\nHost: x\r\n\r\n'):                   # 32 MiB it never reads
        s = socket.create_connection(('127.0.0.1', server.port))
        s.sendall(raw)
        hanging.append(s)
    broken = socket.create_connection(('127.0.0.1', server.port))
    broken.sendall(b'\x00\x01\x02 not http at all\r\n\r\n')
    reply = broken.recv(100)                                          # refused with a 400, or hung up on
    assert reply == b'' or reply.startswith(b'HTTP/1.1 400'), reply
    broken.close()
    half = socket.create_connection(('127.0.0.1', server.port))         # hangs up in the middle of a search
    half.sendall(b'GET /api/search?q=slow HTTP/1.1\r\nHost: x\r\n\r\n')
    assert stub.started.wait(10)
    half.close()
    # while a search runs and the clients above hang, other requests are answered
    assert get(server, '/api/status')[0] == 200 and get(server, '/thumb/a')[0] == 200
    assert get(server, '/video/a', headers={'Range': 'bytes=0-0'})[0] == 206
    assert not stub.release.is_set()
    stub.release.set()
    assert get(server, '/api/search?q=red&k=2')[0] == 200
    for s in hanging:
        s.close()


def test_progress_is_on_the_page_while_the_gallery_is_built(folders):
    steps, stub = threading.Semaphore(0), StubSearcher(['a'])

    def build(log):
        log('gallery: encoding 4 videos')
        for _ in progress.track(range(4), desc='encode videos', unit='videos', count=lambda _: 8):
            assert steps.acquire(timeout=30)
        return {'videos': stub}
    server = search_page.PageServer(build, log=lambda line: None).start()
    try:
        steps.release(2)
        deadline = time.monotonic() + 10
        while (json.loads(get(server, '/api/status')[2]).get('progress') or {}).get('steps') != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        info = json.loads(get(server, '/api/status')[2])
        assert info['state'] == 'encoding' and info['message'] == 'gallery: encoding 4 videos'
        assert info['progress'] == {'what': 'encode videos', 'steps': 2, 'total': 4, 'items': 16, 'done': False}
        status, _, body = get(server, '/api/search?q=red')
        assert status == 503 and json.loads(body)['error'] == ('the gallery is not ready yet (encode videos: 16 done, '
                                                               'batch 2/4); try again in a moment')
        steps.release(2)
        server.wait_ready(10)
        assert get(server, '/api/search?q=red')[0] == 200
        assert json.loads(get(server, '/api/status')[2])['state'] == 'ready'
    finally:
        steps.release(10)
        server.stop()


def test_a_failed_build_is_one_line_on_the_page_and_in_the_terminal(tmp_path, capsys):
    def build(log):
        raise DataError('model_best.pth.tar: not a checkpoint; give the run folder')
    server = search_page.PageServer(build, log=lambda line: None).start()
    try:
        with pytest.raises(DataError, match='not a checkpoint'):
            server.wait_ready(10)
        status, _, body = get(server, '/api/search?q=red')
        assert status == 503 and json.loads(body)['error'] == ('the galleries could not be built: model_best.pth.tar: '
                                                               'not a checkpoint; give the run folder')
    finally:
        server.stop()
    # search.py --serve in the foreground: the server ends, the command prints one line
    with pytest.raises(SystemExit, match='^error: .*no such checkpoint'):
        search.main(['--checkpoint', str(tmp_path / 'missing'), '--serve', '--port', '0', '--device', 'cpu'])
    with pytest.raises(SystemExit, match='^error: --serve takes its queries from the page'):
        search.main(['--checkpoint', str(tmp_path), '--serve', '--query', 'red'])
    with pytest.raises(SystemExit, match="^error: --moments '4:0': window and stride must be positive"):
        search.main(['--checkpoint', str(tmp_path), '--moments', '4:0', '--query', 'red'])
    busy = search_page.bind('127.0.0.1', 0)
    with pytest.raises(DataError, match='cannot listen there'):
        search_page.bind('127.0.0.1', busy.getsockname()[1])
    busy.close()


def test_media_note_for_imported_features(tmp_path):
    assert 'results show video ids only' in search_page.Media(['a']).describe()['note']
    note = search_page.Media(['a'], video_dir=str(tmp_path / 'gone')).describe()['note']
    assert 'does not exist' in note and 'ids only' in note
    (tmp_path / 'v').mkdir()
    (tmp_path / 'v' / 'a.mp4').write_bytes(b'')
    assert 'no thumbnails' in search_page.Media(['a'], video_dir=str(tmp_path / 'v')).describe()['note']


# ============ the load benchmark (util/bench/page.py): counts, never timings ============

def test_load_benchmark_has_no_errors():
    from util.bench import page as bench_page
    rows = bench_page.run(quick=True, log=lambda *_: None)
    by_name = {r[0]: r for r in rows}
    assert by_name['page_errors'][1] == 0
    assert by_name['page_queries'][1] == bench_page.QUICK['clients'] * bench_page.QUICK['queries_per_client']
    p50, p95 = by_name['page_query_p50'][1], by_name['page_query_p95'][1]
    assert 0 < p50 <= p95


# ============ the real thing: demo videos, a trained checkpoint, search.py --serve ============

def _two_colour_videos(demo_run, tmp_path):
    """Two 6 s videos, red then blue and blue then red, extracted with the demo's CLIP at 1 frame per second."""
    from util import extract_features
    from util.make_demo_videos import COLOURS, write_video
    red, blue = COLOURS[0][2], COLOURS[1][2]
    folder = tmp_path / 'two_colours'
    folder.mkdir()
    write_video(str(folder / 'redblue.mp4'), red, seconds=6.0, seed=1, rgb_after=blue)
    write_video(str(folder / 'bluered.mp4'), blue, seconds=6.0, seed=2, rgb_after=red)
    feature_dir = str(tmp_path / 'two_colours_features')
    extract_features.main(['--videos', str(folder), '--out', feature_dir, '--model', demo_run['clip_dir'],
                           '--device', 'cpu', '--progress', '0', '--thumbnails', '1'])
    return feature_dir


def test_moments_find_the_coloured_half(demo_run, tmp_path, capsys):
    """--moments ranks windows: 'red' finds the red half of a red-then-blue or blue-then-red video; each window's
    embedding is the model's embedding of a video made of the window's frames."""
    import torch
    from basic import data_provider as dp
    from util.searcher import Searcher
    feature_dir = _two_colour_videos(demo_run, tmp_path)
    capsys.readouterr()
    search.main(['--checkpoint', demo_run['run_dir'], '--feature_dir', feature_dir, '--moments', '2:1', '--json',
                 '-k', '1', '--device', 'cpu', '--query', 'red', '--query', 'blue', '--query', '蓝色'])
    out = json.loads(capsys.readouterr().out)
    for result, colour in zip(out, ('red', 'blue', 'blue')):
        hit = result['hits'][0]
        first_half = (hit['video_id'] == 'redblue') == (colour == 'red')
        assert (hit['end'] <= 3.0) if first_half else (hit['start'] >= 3.0), (colour, hit)

    s = Searcher.from_checkpoint(demo_run['run_dir'], feature_dir=feature_dir, moments=(2.0, 1.0), cache=False)
    # frames at 0..5 s (the video ends at 6): windows [0,2) [1,3) [2,4) [3,5) [4,6) of each video
    assert s.video_ids == ['bluered'] * 5 + ['redblue'] * 5
    assert s.spans == [(float(t), float(t + 2)) for t in range(5)] * 2
    store = dp.FrameStore(feature_dir)
    frames = store.frames('redblue')[1:3]                                     # the window [1, 3)
    batch = dp.collate([{'index': 0, 'video': (frames, frames.mean(axis=0))}])
    with torch.inference_mode():
        alone = s.model.embed_videos(batch['video'])
    torch.testing.assert_close(s.video_emb[6], alone[0].float(), rtol=1e-5, atol=1e-6)


def _browser():
    """A headless Chromium driven by selenium with Debian's chromedriver; skips when a piece is missing."""
    webdriver = pytest.importorskip('selenium.webdriver', reason='pip install selenium (requirements-optional.txt)')
    from selenium.webdriver.chrome.service import Service
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not browser or not driver:
        pytest.skip('needs Chromium and its driver: apt-get install chromium chromium-driver fonts-noto-cjk')
    os.environ['SE_OFFLINE'] = 'true'                     # selenium must not download a browser or a driver
    import tempfile
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--window-size=1100,760',
                 f'--user-data-dir={tempfile.mkdtemp(prefix="mlcmr_chromium_")}'):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope='module')
def served_demo(demo_run):
    """`search.py --serve --port 0 --moments 1` on the demo, in its own process, as a user starts it."""
    from util.make_demo_videos import COLLECTION
    cmd = [sys.executable, 'search.py', '--checkpoint', demo_run['run_dir'], '--rootpath', demo_run['root'],
           '--collection', COLLECTION, '--serve', '--port', '0', '--device', 'cpu', '--moments', '1',
           '--cache_dir', os.path.join(demo_run['root'], 'page_cache')]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if 'search page ready' in line:
                break
        url = next(line.split()[2] for line in lines if line.startswith('search page: '))
        yield url, lines
    finally:
        proc.terminate()
        proc.wait(30)


def test_api_equals_the_cli_json(served_demo, demo_run, capsys):
    from util.make_demo_videos import COLLECTION
    url, lines = served_demo
    assert any('gallery: encoding 48 videos' in line for line in lines)             # progress in the terminal
    capsys.readouterr()
    search.main(['--checkpoint', demo_run['run_dir'], '--rootpath', demo_run['root'], '--collection', COLLECTION,
                 '--json', '-k', '5', '--device', 'cpu', '--query', '红色',
                 '--cache_dir', os.path.join(demo_run['root'], 'page_cache')])
    cli = json.loads(capsys.readouterr().out)
    port = int(url.rstrip('/').rsplit(':', 1)[1])
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('GET', '/api/search?q=%E7%BA%A2%E8%89%B2&k=5')
    api = json.loads(conn.getresponse().read())
    conn.close()
    assert [h['video_id'] for h in api[0]['hits']] == [h['video_id'] for h in cli[0]['hits']]
    for a, c in zip(api[0]['hits'], cli[0]['hits']):
        assert a == dict(c, score=pytest.approx(c['score'], abs=1e-9))


def test_the_page_in_a_browser(served_demo, demo_run, tmp_path):
    """Type 'red', then '红色': the first video shown is red; a click plays it; a shared link runs its search;
    moments show their time range. Screenshots land in tmp_path."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = served_demo
    colour_of = {vid: c for vid, _, c in demo_run['videos']}
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)

        def search_for(text):
            box = driver.find_element(By.ID, 'q')
            box.clear()
            box.send_keys(text, Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, 'results').get_attribute('data-query') == text)
            return [e.get_attribute('data-video') for e in driver.find_elements(By.CSS_SELECTOR, '#results .hit')]

        for text in ('red', '红色'):
            shown = search_for(text)
            assert len(shown) == 10 and colour_of[shown[0]] == 0, (text, shown[:3])
            driver.save_screenshot(str(tmp_path / f'page_{text}.png'))
        assert '/?q=%E7%BA%A2%E8%89%B2&k=10' in driver.current_url
        first = driver.find_element(By.CSS_SELECTOR, '#results .hit')
        assert first.find_element(By.CSS_SELECTOR, 'img').get_attribute('naturalWidth') == '48'     # a thumbnail
        first.click()
        playing = ("const v = document.querySelector('#results video');"
                   "return v && !v.error && v.readyState >= 2 && v.currentTime > 0")
        wait.until(lambda d: d.execute_script(playing))
        # a shared link runs its search; moments show their time range
        driver.get(url + '?q=blue&k=3&moments=1:0.5')
        wait.until(lambda d: d.find_element(By.ID, 'results').get_attribute('data-query') == 'blue')
        hits = driver.find_elements(By.CSS_SELECTOR, '#results .hit')
        assert len(hits) == 3 and colour_of[hits[0].get_attribute('data-video')] == 1
        assert driver.find_element(By.ID, 'moments').is_selected()
        assert '–' in hits[0].find_element(By.CSS_SELECTOR, '.time').text
        start, end = (float(hits[0].get_attribute(f'data-{x}')) for x in ('start', 'end'))
        hits[0].click()                                      # a moment plays its range
        wait.until(lambda d: d.execute_script("const v = document.querySelector('#results video');"
                                              "return v && v.readyState >= 2 && v.currentTime >= arguments[0]",
                                              start - 0.01))
        src = driver.execute_script("return document.querySelector('#results video').src")
        assert src.endswith(f'#t={start:.3f},{end:.3f}') and end - start <= 1.0
        driver.save_screenshot(str(tmp_path / 'page_moments.png'))
    finally:
        driver.quit()
    assert os.path.getsize(tmp_path / 'page_red.png') > 1000
