"""examples/serve.py: started as a subprocess on a free loopback port, fed real files, a corrupt file, an
empty body and concurrent requests; its answers must equal bat.tag.Tagger's on the same audio."""
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bat.audio import load_audio
from bat.demo import demo_clip

pytest.importorskip("onnxruntime")
from bat.tag import Tagger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["tone", "noise", "clicks"]  # test_tag.py's tagger (the tagger_export fixture): 1.6-s windows


@pytest.fixture(scope="module")
def service(tagger_export, tmp_path_factory):
    model = tagger_export[0] / "model.onnx"  # test_tag.py's tagger, exported once per session
    d = tmp_path_factory.mktemp("serve")
    files = {"short.wav": (demo_clip(0, seconds=0.7)[0], 16000, "FLOAT"),
             "long.flac": (demo_clip(1, seconds=4.3)[0], 16000, "PCM_16"),
             "stereo44.wav": (np.stack([demo_clip(2, seconds=2.0, sample_rate=44100)[0]] * 2, 1), 44100, "PCM_16")}
    for name, (x, sr, subtype) in files.items():
        sf.write(d / name, x, sr, subtype=subtype)
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve.py"), str(model), "--port", "0",
                             "--threads", "1", "--timeout", "3", "--request-timeout", "6", "--max-mb", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ..."
    assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
    url = line.split(" on ")[1].split()[0]
    yield {"url": url, "dir": d, "files": [d / n for n in files], "model": model}
    proc.terminate()
    proc.wait(timeout=30)


def post(url, body, query=""):
    req = urllib.request.Request(f"{url}/tag{query}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_service_answers_like_the_tagger(service):
    tagger = Tagger(service["model"])
    for path in service["files"]:
        status, got = post(service["url"], path.read_bytes(), "?top_k=2&timeline=1")
        assert status == 200, got
        want = tagger.tag(load_audio(path))
        assert got["duration"] == round(want["duration"], 3)
        assert [x["label"] for x in got["labels"]] == [l for l, _ in tagger.top_k(want["scores"], 2)]
        assert abs(got["labels"][0]["score"] - float(want["scores"].max())) < 1e-5
        assert [(w["start"], w["end"]) for w in got["windows"]] == [(round(a, 3), round(b, 3))
                                                                    for a, b, _ in want["windows"]]
    status, got = post(service["url"], service["files"][1].read_bytes())
    assert status == 200 and len(got["labels"]) == len(LABELS) and "windows" not in got  # top_k 5 > 3 classes
    with urllib.request.urlopen(f"{service['url']}/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["labels"] == len(LABELS) and health["window_seconds"] == 1.6


def test_service_rejects_bad_input_with_400(service):
    corrupt = service["dir"] / "corrupt.wav"
    corrupt.write_bytes(service["files"][0].read_bytes()[:40])  # a WAV cut inside its header
    empty = service["dir"] / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    nan = service["dir"] / "nan.wav"
    x = np.zeros(8000, np.float32)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    cases = [(b"", "", "empty body"), (b"not audio at all", "", "cannot decode"),
             (nan.read_bytes(), "", "non-finite"), (service["files"][0].read_bytes(), "?top_k=0", "top_k"),
             (service["files"][0].read_bytes(), "?events=1", "frame-wise"),
             (corrupt.read_bytes(), "", "cannot decode"), (empty.read_bytes(), "", "empty")]
    for body, query, reason in cases:
        status, got = post(service["url"], body, query)
        assert status == 400 and reason in got["error"] and "\n" not in got["error"], (reason, got)
    assert post(service["url"], service["files"][0].read_bytes())[0] == 200  # and the service goes on


def test_service_concurrent_requests_identical(service):
    """8 concurrent requests on one loaded model give the answers of serial ones."""
    bodies = [p.read_bytes() for p in service["files"]] * 3
    serial = [post(service["url"], b, "?timeline=1") for b in bodies[:3]]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda b: post(service["url"], b, "?timeline=1"), bodies))
    for i, got in enumerate(concurrent):
        assert got == serial[i % 3]


def test_a_client_that_stops_sending_is_dropped(service):
    """A body shorter than its Content-Length (or an idle connection) must not hold a server thread forever:
    after --timeout the server closes the connection, and it goes on answering others."""
    import socket
    import time

    host, port = service["url"].split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /tag HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        t0 = time.time()
        assert sock.recv(1024) == b""  # closed by the server, no answer
        assert 2 < time.time() - t0 < 25
    status, got = post(service["url"], service["files"][0].read_bytes())
    assert status == 200, got


def trickle(url, head: bytes, limit: float):
    """Send head, then one byte a second (each gap under the fixture's --timeout 3) until the server answers
    or closes, for at most `limit` seconds: (what it answered, seconds from the first byte)."""
    import socket
    import time

    host, port = url.split("//")[1].split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        t0 = time.monotonic()
        sock.sendall(head)
        while time.monotonic() - t0 < limit:
            sock.settimeout(1.0)  # the gap between two bytes, spent waiting for an answer
            try:
                data = sock.recv(4096)
            except TimeoutError:
                if got:  # an answer, then silence: nothing more will come before the server closes
                    continue
                try:
                    sock.sendall(b"x")
                except OSError:  # closed, reset
                    break
                continue
            except OSError:  # reset by the server
                break
            if not data:  # closed by the server
                break
            got += data
        return got, time.monotonic() - t0


def test_a_client_that_trickles_is_cut_off_at_the_request_timeout(service):
    """A slow-trickle (slowloris) client sends a byte every second, within --timeout 3, so no recv ever times
    out: --request-timeout 6 (from the request's first byte) must still end it, mid-body with a 408 and in the
    headers by closing, well before twice the deadline (the client gives up at 15 s); the server goes on."""
    body, seconds = trickle(service["url"], b"POST /tag HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx", 15)
    assert body.startswith(b"HTTP/1.1 408") and b"--request-timeout" in body and 5.5 < seconds < 12, (body, seconds)
    assert b"Connection: close" in body  # the server closes after it: a pooling client must not reuse the socket
    headers, seconds = trickle(service["url"], b"POST /tag HTTP/1.1\r\nHost: x\r\nX-Slow: ", 15)
    assert headers == b"" and 5.5 < seconds < 12, (headers, seconds)
    status, got = post(service["url"], service["files"][0].read_bytes())
    assert status == 200, got


def test_service_refuses_what_it_cannot_bound(service, tmp_path):
    """Audio longer than --max-seconds (from the header, before decoding: 11 min of silence is a small FLAC
    that decodes to 42 MB) and a body over --max-mb get 413; a chunked body gets 411, and the server goes on."""
    import http.client

    long = tmp_path / "long.flac"
    sf.write(long, np.zeros(660 * 16000, np.float32), 16000)
    status, got = post(service["url"], long.read_bytes())
    assert status == 413 and "lasts 660.0 s" in got["error"] and "at most 600 s" in got["error"], got
    big = b"\0" * (2 * 2**20 + 1)  # the fixture's --max-mb 2; urllib sends it whole without waiting (no Expect)
    status, got = post(service["url"], big)
    assert status == 413 and "at most" in got["error"], got
    host, port = service["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/tag", body=iter([b"RIFF" * 16]), encode_chunked=True,  # small: sent before the answer
                 headers={"Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()
    assert post(service["url"], service["files"][0].read_bytes())[0] == 200


def test_service_flags_are_checked_one_at_a_time(service):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), str(service["model"]), "--threads", "100000"],
                       capture_output=True, text=True, timeout=60)
    error = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "--threads must be in 0.." in error and "--port" not in error, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), str(service["model"]),
                        "--request-timeout", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--request-timeout must be in (0, 1e6) s")
