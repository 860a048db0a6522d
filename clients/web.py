"""Serve a release to a browser: the page in ``web/dist`` plus the release's ONNX model and labels, on loopback.

    python -m clients.web --release RUN_DIR/release [--port N]

The page is built from ``web/`` into ``web/dist`` with ``make web``, once, with Node 20 and npm (the
build is not committed: onnxruntime-web's WASM binary alone is 14.8 MB). It decodes a WAV file or a
microphone recording, resamples it to 16 kHz and runs ``emotion_model.onnx`` with onnxruntime-web
(WASM) in the browser. Only the built page's own files, ``/release/emotion_model.onnx`` and
``/release/labels.json`` are served; anything else is 404. Every response carries a
Content-Security-Policy that lets the page connect to this origin only (no third-party origin for
scripts, styles, images or connections), so the audio cannot leave the browser. The server binds
127.0.0.1 only; ``--port 0`` picks a free port.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from clients.cli import EXIT_OK, fail

log = logging.getLogger("fl_ser.web")

WEB = Path(__file__).resolve().parents[1] / "web"
DIST = WEB / "dist"
HOST = "127.0.0.1"
DEFAULT_PORT = 8470
MODEL = "emotion_model.onnx"
LABELS = "labels.json"
#: The release's files as the page asks for them (web/src/model.js).
RELEASE_ROUTES = {f"/release/{MODEL}": MODEL, f"/release/{LABELS}": LABELS}
#: What web/build.mjs writes beside the page: the hash of the sources it was built from (:func:`sources_hash`).
STAMP = "build.json"
BUILD_COMMAND = "make web (or: cd web && npm ci && npm run build; needs Node 20 and npm)"
#: What the page may load and connect to: this origin only. WebAssembly compilation needs 'wasm-unsafe-eval'.
CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; style-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",
}
MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
}


class WebError(RuntimeError):
    """The page cannot be served: the release or the built page is missing, incomplete or stale."""


def sources_hash(web: Path = WEB) -> str:
    """The hash ``web/build.mjs`` writes into :data:`STAMP`: each source's path and SHA-256, in path order."""
    files = ["build.mjs", "package.json", "package-lock.json",
             *(f"src/{p.name}" for p in (web / "src").iterdir() if p.is_file())]
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256((web / name).read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def page_routes(dist: Path = DIST, web: Path = WEB) -> dict[str, Path]:
    """URL path -> file for the built page (its :data:`STAMP` is not served); raises :class:`WebError` if it is not
    built or was built from other sources."""
    if not (dist / "index.html").is_file() or not (dist / STAMP).is_file():
        raise WebError(f"the web page is not built ({dist} lacks index.html or {STAMP}); build it with "
                       f"{BUILD_COMMAND}")
    if (web / "src").is_dir() and json.loads((dist / STAMP).read_text())["sources"] != sources_hash(web):
        raise WebError(f"{dist} was built from other sources than those in {web} ({STAMP}'s hash differs); "
                       f"rebuild it with {BUILD_COMMAND}")
    routes = {"/" + p.relative_to(dist).as_posix(): p for p in dist.rglob("*") if p.is_file() and p != dist / STAMP}
    unknown = sorted(path for path in routes if Path(path).suffix not in MIME)
    if unknown:
        raise WebError(f"{dist} holds files of no known type {unknown}; add their MIME type to clients/web.py")
    return {"/": dist / "index.html", **routes}


def release_routes(release: Path) -> dict[str, Path]:
    """URL path -> file for the release's model and labels; raises :class:`WebError` naming what is missing."""
    if not release.is_dir():
        raise WebError(f"no release at {release}; pass --release RUN_DIR/release, the release/ folder of a "
                       "finished run (make run writes one)")
    if not (release / MODEL).is_file():
        held = sorted(p.name for p in release.iterdir())
        raise WebError(f"{release} has no {MODEL} (it holds {held}): a run made before releases were exported to "
                       "ONNX, or one whose model could not be (its train.log says why); pass the release of a run "
                       "that has one, or train again (make run)")
    labels = release / LABELS
    if not labels.is_file():
        raise WebError(f"{release} has no {LABELS}, the class names in output order; copy it from the run's "
                       "release, or export the release again")
    try:
        names = json.loads(labels.read_text())
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise WebError(f"{labels} is not a list of class names; export the release again")
    return {route: release / name for route, name in RELEASE_ROUTES.items()}


def make_handler(routes: dict[str, Path]) -> type[BaseHTTPRequestHandler]:
    """A request handler that serves exactly ``routes`` (GET and HEAD), with :data:`HEADERS` on every response."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "fl-ser-web"
        sys_version = ""

        def _headers(self, status: int, mime: str, length: int) -> None:
            self.send_response(status)
            for name, value in HEADERS.items():
                self.send_header(name, value)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = routes.get(self.path.split("?", 1)[0])
            if path is None:
                message = b"not found: this server serves only the page, the model and its labels\n"
                self._headers(404, "text/plain; charset=utf-8", len(message))
                if body:
                    self.wfile.write(message)
                return
            self._headers(200, MIME[path.suffix], path.stat().st_size)
            if body:
                with path.open("rb") as f:
                    shutil.copyfileobj(f, self.wfile)

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def log_message(self, format: str, *args) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(release: str | Path, port: int = DEFAULT_PORT, dist: Path = DIST) -> ThreadingHTTPServer:
    """A threaded server for ``release`` on 127.0.0.1:``port`` (0: a free one), not yet serving."""
    routes = {**page_routes(dist), **release_routes(Path(release))}
    server = ThreadingHTTPServer((HOST, port), make_handler(routes))
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread (stop it with ``server.shutdown()``)."""
    thread = threading.Thread(target=server.serve_forever, name="fl-ser-web", daemon=True)
    thread.start()
    return thread


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="a run's release/ folder (emotion_model.onnx, labels.json)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT}; 0: "
                                                                       "any free one)")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.release, args.port)
    except WebError as err:
        return fail(err)
    except OSError as err:
        return fail(OSError(f"cannot listen on {HOST}:{args.port} ({err.strerror}); choose another --port"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"serving {Path(args.release).resolve()} at {url_of(server)} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
