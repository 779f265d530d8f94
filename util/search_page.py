"""The search page: a local web server over a Searcher (search.py --serve; docs/search.md, 'The search page').

    GET /                      the page (util/search_page.html): a query box, results as a grid of thumbnails;
                               a click plays the video from the matched moment. /?q=red&k=10 runs that search.
    GET /api/search?q=&k=      the JSON of `search.py --json` (a list with one result); optional second= (an
                               English text fused with the query) and moments=W:S (the windows gallery, when the
                               server was started with --moments).
    GET /api/status            encoding progress, galleries, what media the page can show.
    GET /video/<id>            the video file of a gallery video (HTTP ranges, so the browser can seek).
    GET /thumb/<id>?t=<s>      its thumbnail: the frame at t seconds, or the video's own.

Safe to leave running: it binds 127.0.0.1 unless told otherwise; it serves only the files of gallery videos
found inside the video and thumbnail folders (ids are looked up, never joined as paths by themselves, and the
resolved path, symlinks followed, must lie inside the folder: anything else is a 404 before any file is
opened); the query length and k are bounded; a malformed request gets a 4xx with a one-line message, an error
inside a 500 with one line (the traceback goes to the terminal only). The server is asynchronous (Starlette on
uvicorn): a slow or broken client holds only its own connection. Searches run one at a time on a worker
thread (the tokenizer and the model are shared), waiting requests hold no thread, and at most MAX_WAITING wait.

The galleries are built (loaded from the cache, or encoded) on a background thread once the server is up;
their progress shows in the terminal (basic/progress.py) and on the page (/api/status, via progress.listen).
Any object with the Searcher's search(queries, k, second=) -> [Result] and video_ids can be served; with a
`source` (a GallerySource, as Searcher.from_checkpoint sets) the page finds the videos, frame times and
thumbnails the extractor recorded beside the features.
"""
import asyncio
import logging
import os
import socket
import sys
import threading
import time

import numpy as np

from basic import media
from basic import progress
from basic.errors import DataError

logger = logging.getLogger('mlcmr')

MAX_QUERY_CHARS = 500     # per text (query, second)
MAX_K = 100
MAX_WAITING = 64          # searches queued behind the running one; more get a 503
PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'search_page.html')


class BadRequest(Exception):
    """A request the page refuses: (HTTP status, one-line message)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


# ============ media: the only files the server reads ============

class Media:
    """The video files and thumbnails of a gallery's videos: a path is only ever the resolved path of a known
    video id's file that lies inside its folder."""

    def __init__(self, video_ids, video_dir=None, thumb_dir=None, times=None, feature_dir=None):
        self.ids = set(video_ids)
        self.video_dir = _real_folder(video_dir)
        self.thumb_dir = _real_folder(thumb_dir)
        found = media.video_files(self.video_dir) if self.video_dir else {}
        self.files = {v: name for v, name in found.items() if v in self.ids}
        self.times = times or {}
        self.requested_video_dir, self.feature_dir = video_dir, feature_dir

    @classmethod
    def of(cls, searcher, video_dir=None, thumb_dir=None):
        """Media of a searcher's videos: video_dir (default: the folder the extractor recorded beside the
        features) and thumb_dir (default: <feature folder>/thumbnails)."""
        source = getattr(searcher, 'source', None)
        if source is None:
            return cls(searcher.video_ids, video_dir, thumb_dir)
        feature_dir = source.store.path
        video_dir = video_dir or media.read_video_folder(feature_dir)
        thumb_dir = thumb_dir or os.path.join(feature_dir, media.THUMBNAILS)
        times = media.load_frame_times(feature_dir, source.store.video2frames)
        return cls(source.video_ids, video_dir, thumb_dir, times, feature_dir)

    @staticmethod
    def _inside(folder, path):
        """The resolved `path` when it is a file inside `folder` (itself resolved), else None."""
        real = os.path.realpath(path)
        if folder and real.startswith(folder + os.sep) and os.path.isfile(real):
            return real
        return None

    def video(self, vid):
        if vid not in self.files:
            return None
        return self._inside(self.video_dir, os.path.join(self.video_dir, self.files[vid]))

    def thumbnail(self, vid, t=None):
        """The JPEG of the frame at or just after `t` seconds (the window's first frame), else the video's."""
        if vid not in self.ids or self.thumb_dir is None or media.check_file_name(vid):
            return None
        times = self.times.get(vid)
        if t is not None and times is not None:
            frame = min(int(np.searchsorted(times, t - 1e-3)), len(times) - 1)
            found = self._inside(self.thumb_dir, media.thumbnail_path(self.thumb_dir, vid, frame))
            if found:
                return found
        return self._inside(self.thumb_dir, media.thumbnail_path(self.thumb_dir, vid))

    def describe(self):
        """What the page can show, and a note when it is only ids."""
        thumbs = bool(self.thumb_dir)
        if not self.video_dir:
            where = (f'the video folder {self.requested_video_dir} does not exist' if self.requested_video_dir
                     else 'no video folder is recorded beside the features (imported features?)')
            note = f'{where}: results show video ids only; pass --videos DIR to play them'
        elif not self.files:
            note = f'no video files of this gallery in {self.video_dir}: results show video ids only'
        elif not thumbs:
            note = 'no thumbnails: extract with util/extract_features.py --thumbnails 1 to see them'
        else:
            note = ''
        return {'video_dir': self.video_dir, 'video_files': len(self.files), 'thumbnails': thumbs, 'note': note}


def _real_folder(folder):
    return os.path.realpath(folder) if folder and os.path.isdir(folder) else None


# ============ state: progress, galleries, the one search at a time ============

class PageState:
    """What the page shows: the build's phase and progress, then the galleries ('videos', and 'moments' when
    built) and their media; or the error that stopped the build."""

    def __init__(self, log=None):
        self.phase, self.message, self.progress, self.error = 'starting', 'starting', None, None
        self.galleries, self.media = None, None
        self.search_lock = threading.Lock()
        self.waiting = 0
        self.say = log or (lambda line: print(line, file=sys.stderr, flush=True))

    # ---- the build (background thread) ----
    def log(self, line):
        self.message = line
        self.say(line)

    def on_progress(self, p):
        self.phase = 'encoding'
        self.progress = {'what': p.desc, 'steps': p.steps, 'total': p.total, 'items': p.samples, 'done': p.closed}

    def build(self, build, video_dir=None, thumb_dir=None):
        """Run build(log) -> {'videos': searcher, 'moments': searcher or absent}; keeps the error (one line)."""
        try:
            with progress.listen(self.on_progress):
                galleries = build(self.log)
            self.media = Media.of(galleries['videos'], video_dir, thumb_dir)
            self.galleries = galleries
            note = self.media.describe()['note']
            self.phase, self.progress = 'ready', None
            self.log('search page ready: ' + ', '.join(f'{name} {len(s.video_ids)}' for name, s in galleries.items())
                     + (f' ({note})' if note else ''))
        except DataError as e:
            self.error, self.phase = str(e), 'failed'
            self.say(f'error: {e}')
        except Exception as e:                         # a bug: the traceback to the terminal, one line to the page
            logger.exception('building the search galleries failed')
            self.error, self.phase = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}', 'failed'

    def status(self):
        out = {'state': self.phase, 'message': self.message, 'progress': self.progress, 'error': self.error,
               'limits': {'max_k': MAX_K, 'max_query_chars': MAX_QUERY_CHARS}}
        if self.galleries:
            out['galleries'] = {name: {'items': len(s.video_ids),
                                       'moments': _moments_text(getattr(s, 'moments', None))}
                                for name, s in self.galleries.items()}
            out['media'] = self.media.describe()
        return out

    # ---- a search (worker thread) ----
    def search(self, gallery, query, k, second):
        with self.search_lock:
            return self.galleries[gallery].search([query], k, second=[second] if second else None)


def _moments_text(moments):
    return None if moments is None else media.format_moments(*moments)


# ============ requests ============

def _one(params, name, default=None):
    values = params.getlist(name)
    if len(values) > 1:
        raise BadRequest(400, f'{name}: given {len(values)} times; give it once')
    return values[0] if values else default


def _text(params, name, required):
    value = _one(params, name)
    if value is None or not value.strip():
        if required:
            raise BadRequest(400, f'{name}: missing or empty; e.g. /api/search?q=a+dog+surfing&k=10')
        return None
    if len(value) > MAX_QUERY_CHARS:
        raise BadRequest(400, f'{name}: {len(value)} characters; at most {MAX_QUERY_CHARS}')
    if any(ord(c) < 32 or c == '\x7f' for c in value):
        raise BadRequest(400, f'{name}: control characters are not allowed')
    return value.strip()


def parse_search(params, state):
    """(gallery name, query, k, second) of /api/search's parameters; BadRequest when malformed."""
    query = _text(params, 'q', required=True)
    second = _text(params, 'second', required=False)
    k_text = _one(params, 'k', '10')
    try:
        k = int(k_text)
    except ValueError:
        raise BadRequest(400, f'k: {k_text[:20]!r} is not a whole number; 1 to {MAX_K}') from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f'k: {k} is out of range; 1 to {MAX_K}')
    moments = _one(params, 'moments')
    if state.galleries is None:
        raise BadRequest(503, state.error and f'the galleries could not be built: {state.error}'
                         or f'the gallery is not ready yet ({_progress_text(state)}); try again in a moment')
    if not moments:
        return 'videos', query, k, second
    try:
        asked = media.parse_moments(moments)
    except ValueError as e:
        raise BadRequest(400, str(e)) from None
    served = getattr(state.galleries.get('moments'), 'moments', None)
    if served is None:
        raise BadRequest(400, 'moments: this server has no moments gallery; start it with search.py --serve '
                              '--moments WINDOW_S[:STRIDE_S]')
    if not np.allclose(asked, served):
        raise BadRequest(400, f'moments: this server searches windows of {_moments_text(served)} (window:stride '
                              'seconds) only; ask for those or restart it with another --moments')
    return 'moments', query, k, second


def _progress_text(state):
    p = state.progress
    if not p:
        return state.message
    return f'{p["what"]}: {p["items"]} done' + (f', batch {p["steps"]}/{p["total"]}' if p['total'] else '')


# ============ the app ============

def create_app(state):
    """The Starlette app of the page over `state` (a PageState)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    with open(PAGE_FILE, encoding='utf-8') as f:
        page_html = f.read()
    gate = asyncio.Lock()

    def refuse(request, status, message):
        message = ' '.join(str(message).split())          # one line, whatever the cause
        if request.url.path.startswith('/api/'):
            return JSONResponse({'error': message}, status_code=status)
        return PlainTextResponse(message + '\n', status_code=status)

    async def page(request):
        return HTMLResponse(page_html, headers={'Cache-Control': 'no-store'})

    async def api_status(request):
        return JSONResponse(state.status())

    async def api_search(request):
        try:
            gallery, query, k, second = parse_search(request.query_params, state)
        except BadRequest as e:
            return refuse(request, e.status, e.message)
        if state.waiting >= MAX_WAITING:
            return refuse(request, 503, f'{state.waiting} searches are waiting; try again in a moment')
        state.waiting += 1
        try:
            async with gate:                              # waiting here holds no thread
                results = await run_in_threadpool(state.search, gallery, query, k, second)
        finally:
            state.waiting -= 1
        return JSONResponse([r.to_dict() for r in results])

    def _file(request, path, media_type=None):
        if path is None:
            return refuse(request, 404, f'not found: {request.url.path}')
        return FileResponse(path, media_type=media_type, headers={'Cache-Control': 'max-age=3600'})

    async def video(request):
        found = state.media.video(request.path_params['vid']) if state.media else None
        return _file(request, found)

    async def thumb(request):
        t = request.query_params.get('t')
        try:
            t = None if t is None else float(t)
        except ValueError:
            return refuse(request, 400, f't: {t[:20]!r} is not a number of seconds')
        found = state.media.thumbnail(request.path_params['vid'], t) if state.media else None
        return _file(request, found, 'image/jpeg')

    async def http_error(request, exc):
        text = {404: f'not found: {request.url.path}', 405: f'{request.method} is not allowed here; use GET'}
        return refuse(request, exc.status_code, text.get(exc.status_code, exc.detail))

    async def server_error(request, exc):
        logger.error('%s %s failed', request.method, request.url.path, exc_info=exc)
        return refuse(request, 500, f'internal error ({type(exc).__name__}); the server\'s terminal has the details')

    routes = [Route('/', page), Route('/api/search', api_search), Route('/api/status', api_status),
              Route('/video/{vid}', video), Route('/thumb/{vid}', thumb)]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


# ============ the server ============

def bind(host, port):
    """A listening TCP socket on host:port (port 0: any free one); a DataError when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise DataError(f'--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another '
                        '--port (0: any free port)') from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class PageServer:
    """The page on host:port over the galleries build(log) returns, built on a background thread once the
    server listens. run() serves until Ctrl-C; start() / stop() run it on a thread (tests, the benchmark)."""

    def __init__(self, build, host='127.0.0.1', port=0, video_dir=None, thumb_dir=None, log=None):
        try:
            import starlette  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise DataError(f'the search page needs {e.name}: pip install starlette uvicorn '
                            '(requirements-optional.txt)') from None
        self.state = PageState(log)
        self.sock = bind(host, port)
        name = self.sock.getsockname()
        self.host, self.port = host, name[1]
        shown = f'[{host}]' if ':' in host else host
        self.url = f'http://{shown}:{self.port}/'
        self._build = lambda: self.state.build(build, video_dir, thumb_dir)
        config = uvicorn.Config(create_app(self.state), log_level='warning', access_log=False,
                                timeout_keep_alive=5, limit_concurrency=256, lifespan='off')
        self.server = uvicorn.Server(config)
        self._thread = None
        if host not in ('127.0.0.1', 'localhost', '::1'):
            self.state.say(f'warning: --host {host} makes the page reachable from other machines')

    def run(self):
        """Serve until interrupted; a build that failed ends the server and raises its DataError."""
        builder = threading.Thread(target=self._build_then_check, name='search-page-build', daemon=True)
        self.state.say(f'search page: {self.url}  (Ctrl-C stops it)')
        builder.start()
        self.server.run(sockets=[self.sock])
        if self.state.error:
            raise DataError(self.state.error)

    def _build_then_check(self):
        self._build()
        if self.state.error and self._thread is None:    # run() in the foreground: end it with the error
            self.server.should_exit = True

    def start(self, timeout=30):
        self._thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self.sock]},
                                        name='search-page', daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError('the search page did not start')
            time.sleep(0.02)
        threading.Thread(target=self._build, name='search-page-build', daemon=True).start()
        return self

    def wait_ready(self, timeout=600):
        deadline = time.monotonic() + timeout
        while self.state.phase not in ('ready', 'failed'):
            if time.monotonic() > deadline:
                raise TimeoutError(f'the galleries were not built in {timeout} s')
            time.sleep(0.05)
        if self.state.error:
            raise DataError(self.state.error)
        return self

    def stop(self):
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()

