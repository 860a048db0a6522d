"""A browser is a device too: ``clients.web`` serves a release and headless Chromium runs its ONNX model.

Without a browser: the server's routes, MIME types, security headers and errors. In a real browser
(Debian's Chromium driven by Playwright; ``scripts/install_browser.sh`` installs it when CI=true): the
page's probabilities and top label equal onnxruntime's in Python on the same 16 kHz file within 1e-4;
on a 44.1 kHz file (resampled by the browser, by torchaudio in Python) they stay within a measured
tolerance; the page requests nothing but its own files, the model and the labels, from its own origin;
its Content-Security-Policy blocks every other connection; and the microphone path classifies
Chromium's fake capture device. The page is saved as a screenshot in pytest's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf
from conftest import ALL_FORMATS, EMODB, REPO, make_config

from clients import web

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_BROWSER = REPO / "scripts" / "install_browser.sh"
#: Page vs Python on an already-16-kHz file: the same samples, the same model, two builds of onnxruntime.
EXACT = 1e-4
#: Page vs Python on a 44.1 kHz file: the page's resampler (float64) against torchaudio's (float32). Measured: 3.6e-6
#: in the waveform and 5.1e-7 in a probability on EmoDB, 6.3e-7 and 2.5e-5 on the synthetic file (the pitch
#: tracker's choice of peak amplifies tiny differences).
RESAMPLED = 1e-3
RESAMPLED_WAVE = 1e-5  # in the waveform (full scale 1)
SECONDS = 3.0  # of the test recording


# -- the release ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def built_page() -> None:
    """The page, built with ``make web`` when web/dist is missing or stale (it is a build output, not committed)."""
    try:
        web.page_routes()
        return
    except web.WebError:
        pass
    if shutil.which("npm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Node 20 and npm to build the browser page (make web)")
        pytest.skip("the browser page is not built and npm is missing: install Node 20 and npm, then make web")
    done = subprocess.run(["make", "web"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    web.page_routes()  # raises if the build is still not what clients.web serves


def recording() -> tuple[str, np.ndarray, int]:
    """A real utterance at its own rate (float32 mono): the first EmoDB file (22.05 kHz) when EmoDB is here, else
    a synthetic one (16 kHz); its name, wave and rate."""
    from fl_ser.data.synthetic import SyntheticCorpus

    if EMODB.exists():
        path = sorted((EMODB / "wav").glob("*.wav"))[0]
        wave, rate = sf.read(path, dtype="float32")
        return f"EmoDB {path.name}", wave, rate
    corpus = SyntheticCorpus()
    speaker = corpus.speakers[0]
    return f"synthetic {speaker} anger", corpus.synthesize(speaker, "anger"), 16_000


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> dict[int, Path]:
    """The recording (its first SECONDS) as 16-bit WAV files at 16 kHz and at 44.1 kHz, each resampled from its own
    rate by torchaudio."""
    import torch
    import torchaudio.functional

    folder = tmp_path_factory.mktemp("wavs")
    name, wave, rate = recording()
    wave = torch.from_numpy(wave[: int(SECONDS * rate)])
    print(f"test recording: {name} ({rate} Hz), {len(wave) / rate:.2f} s")
    paths = {}
    for target in (16_000, 44_100):
        paths[target] = folder / f"speech_{target // 1000}k.wav"
        sf.write(paths[target], torchaudio.functional.resample(wave, rate, target).numpy(), target, subtype="PCM_16")
    return paths


@pytest.fixture(scope="module")
def release(tmp_path_factory, wavs) -> Path:
    """A release written as a run writes one (server.release.release_model: every format checked against the
    eager model, on the test recording too; labels.json; config.yaml): the federation's initial linear model
    (round 0, so its probabilities spread over every class, as a comparison at 1e-4 needs) behind a normaliser
    fitted on one synthetic speaker's functionals."""
    from fl_ser.data.audio import read_audio
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.features.normalize import FeatureNormalizer
    from fl_ser.task import get_arrays, new_classifier, speaker_data
    from server.release import release_model

    tmp = tmp_path_factory.mktemp("web_release")
    cfg = make_config(tmp, "model=linear", ALL_FORMATS)
    data = speaker_data(cfg, corpus_from_config(cfg).speakers[0])
    normalizer = FeatureNormalizer(tuple(data.x.shape[1:]), "vector", bound=2.0).fit(data.x)
    folder = tmp / "run" / "release"
    written = release_model(cfg, get_arrays(new_classifier(cfg, len(cfg.labels))), normalizer, folder,
                            waves=[read_audio(wavs[16_000])])
    if "onnx" in written["unavailable"]:
        pytest.fail(f"the release has no ONNX model, so no browser can run it: {written['unavailable']['onnx']}")
    return folder


def onnx_probabilities(release: Path, wav: Path) -> np.ndarray:
    """onnxruntime's probabilities in Python for the file as fl_ser reads it (read_audio: mono, 16 kHz)."""
    import onnxruntime

    from fl_ser.data.audio import read_audio

    session = onnxruntime.InferenceSession(str(release / web.MODEL), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: read_audio(wav)[None]})[0][0]


# -- the server, without a browser ---------------------------------------------------------------------
@pytest.fixture
def served(release):
    server = web.make_server(release, port=0)
    web.serve_in_thread(server)
    yield web.url_of(server)
    server.shutdown()
    server.server_close()


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.mark.slow
def test_server_serves_the_page_model_and_labels_only_with_csp_and_mime_types(served, release):
    expected = {"": "text/html; charset=utf-8", "ui.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8", "ort-wasm-simd-threaded.wasm": "application/wasm",
                "release/emotion_model.onnx": "application/octet-stream", "release/labels.json": "application/json"}
    for path, mime in expected.items():
        status, headers, _ = fetch(served + path)
        assert status == 200 and headers["Content-Type"] == mime, path
        assert headers["Content-Security-Policy"] == web.CSP and headers["X-Content-Type-Options"] == "nosniff"
    assert fetch(served + "release/emotion_model.onnx")[2] == (release / web.MODEL).read_bytes()
    for path in ("release/config.yaml", "release/emotion_model.pt", "build.json", "../pyproject.toml", "nope"):
        status, headers, _ = fetch(served + path)
        assert status == 404 and headers["Content-Security-Policy"] == web.CSP, path
    csp = dict(part.strip().split(" ", 1) for part in web.CSP.split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert "http" not in web.CSP and "*" not in web.CSP  # no other origin anywhere


def test_missing_release_model_labels_and_page_are_named_with_their_fix(tmp_path, capsys):
    missing = tmp_path / "run" / "release"
    assert web.main(["--release", str(missing), "--port", "0"]) == 1
    assert f"no release at {missing}" in capsys.readouterr().err
    missing.mkdir(parents=True)
    (missing / "emotion_model.pt").write_bytes(b"TorchScript")
    assert web.main(["--release", str(missing), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "has no emotion_model.onnx" in err and "['emotion_model.pt']" in err and "make run" in err
    (missing / web.MODEL).write_bytes(b"ONNX")  # the server does not parse the model; the browser does
    with pytest.raises(web.WebError, match=r"has no labels\.json"):
        web.release_routes(missing)
    (missing / web.LABELS).write_text('{"anger": 0}')
    with pytest.raises(web.WebError, match="not a list of class names"):
        web.release_routes(missing)
    with pytest.raises(web.WebError, match=r"the web page is not built .* make web"):
        web.page_routes(tmp_path / "dist", tmp_path)


def test_a_page_built_from_other_sources_is_refused(tmp_path):
    copy = tmp_path / "web"
    shutil.copytree(web.WEB, copy, ignore=shutil.ignore_patterns("node_modules"))
    assert web.page_routes(copy / "dist", copy)["/"] == copy / "dist" / "index.html"  # built_page's build is current
    (copy / "src" / "ui.js").write_text((copy / "src" / "ui.js").read_text() + "\n// edited\n")
    with pytest.raises(web.WebError, match=r"built from other sources .* rebuild it with make web"):
        web.page_routes(copy / "dist", copy)


# -- in Chromium ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    why = f"no Chromium at {CHROMIUM}; install it with: sudo bash {INSTALL_BROWSER.relative_to(REPO)}"
    if not CHROMIUM.exists() and os.environ.get("CI") == "true":
        done = subprocess.run(["bash", str(INSTALL_BROWSER)], capture_output=True, text=True)
        why = (f"{INSTALL_BROWSER.name} could not install Chromium (exit {done.returncode}): "
               f"{done.stderr.strip()[-300:]}")
    if not CHROMIUM.exists():
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        yield chromium
        chromium.close()


#: Records CSP violations in the page (Playwright's init scripts run outside the page's CSP).
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => window.cspViolations.push(
  {directive: e.effectiveDirective, blocked: e.blockedURI}));
"""


@pytest.fixture
def page(browser, served):
    """The page, loaded and ready (model and labels fetched); ``page.requests`` lists every URL it asked for,
    ``page.failures`` each failed request's error."""
    context = browser.new_context()
    page = context.new_page()
    page.requests, page.failures = [], {}
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("requestfailed", lambda request: page.failures.setdefault(request.url, request.failure))
    page.add_init_script(RECORD_VIOLATIONS)
    page.goto(served)
    page.wait_for_selector("#status[data-state=ready], #status[data-state=error]", state="attached", timeout=120_000)
    assert page.get_attribute("#status", "data-state") == "ready", page.text_content("#status")
    yield page
    context.close()


def finished(page, source: str) -> None:
    """Wait until the page has classified ``source`` (the page's CSP forbids the eval of wait_for_function)."""
    page.wait_for_selector(f'#status[data-source="{source}"]:is([data-state=done], [data-state=error])',
                           state="attached", timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")


def classify_in_page(page, wav: Path) -> tuple[str, np.ndarray, list[str]]:
    """Give the page a file; its top label, the probability each meter shows, and the labels in order."""
    page.set_input_files("#file", str(wav))
    finished(page, wav.name)
    meters = page.eval_on_selector_all("#bars meter", "ms => ms.map(m => [m.dataset.label, m.value])")
    labels, values = zip(*meters, strict=True)
    return page.get_attribute("#top", "data-label"), np.array(values), list(labels)


@pytest.mark.slow
def test_the_page_gives_onnxruntime_probabilities_and_asks_for_nothing_else(page, served, release, wavs,
                                                                           tmp_path):
    labels = json.loads((release / web.LABELS).read_text())
    for rate, tolerance in ((16_000, EXACT), (44_100, RESAMPLED)):
        top, shown, names = classify_in_page(page, wavs[rate])
        want = onnx_probabilities(release, wavs[rate])
        difference = float(np.abs(shown - want).max())
        print(f"{rate} Hz file: page vs onnxruntime in Python, max |difference| = {difference:.3g}; "
              f"inference {page.get_attribute('#result', 'data-inference-ms')} ms")
        print(f"  probabilities {np.round(want, 4).tolist()}")
        assert names == labels and want.min() > 1e-3  # every probability informative (none saturated)
        assert difference <= tolerance, (rate, shown, want)
        assert top == labels[int(np.argmax(want))]
        texts = page.eval_on_selector_all("#bars .value", "vs => vs.map(v => v.textContent)")
        assert texts == [f"{100 * p:.1f} %" for p in shown]  # each bar has its value as text
    print(f"model and labels loaded in {page.get_attribute('body', 'data-load-ms')} ms")
    page.screenshot(path=str(tmp_path / "web_page.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'web_page.png'}")

    origin = urlsplit(served)
    allowed = set(web.page_routes()) | set(web.RELEASE_ROUTES)
    asked = [urlsplit(url) for url in page.requests]
    assert {(u.scheme, u.netloc) for u in asked} == {(origin.scheme, origin.netloc)}, page.requests
    assert {u.path for u in asked} <= allowed, page.requests
    assert set(web.RELEASE_ROUTES) <= {u.path for u in asked}
    assert page.evaluate("window.cspViolations") == []


DECODE_IN_PAGE = """async (bytes) => {
    const audio = await import('./audio.js');
    return Array.from(await audio.decodeToMono16k(new Uint8Array(bytes).buffer));
}"""


@pytest.mark.slow
def test_the_page_decodes_and_resamples_as_read_audio_does(page, wavs):
    """The page's own decoder (audio.js) against read_audio, sample by sample: exact at 16 kHz, and within
    float32 rounding at 44.1 kHz (both run torchaudio's windowed-sinc resampler)."""
    from fl_ser.data.audio import read_audio

    for rate, wav in wavs.items():
        in_page = np.array(page.evaluate(DECODE_IN_PAGE, list(wav.read_bytes())), dtype=np.float32)
        python = read_audio(wav)
        assert in_page.shape == python.shape, rate
        error = np.abs(in_page - python).max()
        print(f"{rate} Hz file -> 16 kHz, page vs read_audio: max |difference| {error:.3g} "
              f"(peak {np.abs(python).max():.3f})")
        assert error <= (0 if rate == 16_000 else RESAMPLED_WAVE), rate


@pytest.mark.slow
def test_the_csp_blocks_every_other_origin(page, served):
    port = urlsplit(served).port
    blocked = page.evaluate("""async (others) => {
        const outcomes = [];
        for (const url of others) {
            try { await fetch(url, {method: 'POST', body: 'audio'}); outcomes.push('sent'); }
            catch (err) { outcomes.push('blocked'); }
        }
        const image = new Image(); image.src = others[0];
        await new Promise((resolve) => setTimeout(resolve, 200));
        return outcomes;
    }""", [f"http://localhost:{port}/", f"http://127.0.0.1:{port + 1}/", "https://example.org/upload"])
    assert blocked == ["blocked"] * 3
    directives = {v["directive"] for v in page.evaluate("window.cspViolations")}
    assert directives == {"connect-src", "img-src"}
    others = {url for url in page.requests if urlsplit(url).netloc != urlsplit(served).netloc}
    assert all(page.failures.get(url) == "csp" for url in others), page.failures  # refused by the CSP, never sent


@pytest.mark.slow
def test_the_microphone_is_classified_in_the_page(page, release):
    """Chromium's fake capture device (a beep): recorded, decoded and classified like a file."""
    page.fill("#seconds", "1")
    page.click("#record")
    finished(page, "the microphone")
    values = np.array(page.eval_on_selector_all("#bars meter", "ms => ms.map(m => m.value)"))
    assert len(values) == len(json.loads((release / web.LABELS).read_text()))
    assert abs(values.sum() - 1) < 1e-4 and page.get_attribute("#top", "data-label") in json.loads(
        (release / web.LABELS).read_text())
    seconds = float(page.text_content("#details").split(": ")[1].split(" s")[0])
    assert 0.5 <= seconds <= 1.5  # about the second asked for
