"""A tagging service you can copy: one exported model, standard-library HTTP, JSON answers. No PyTorch.

    python examples/serve.py runs/cgp/tagger.onnx --port 8000
    curl --data-binary @clip.wav 'http://127.0.0.1:8000/tag?top_k=3&timeline=1'
    curl http://127.0.0.1:8000/health

POST /tag with the audio file's bytes as the body (any format and rate soundfile reads: wav, flac, ogg,
mp3, ...). The answer is JSON: {"duration", "labels": [{"label", "score"}, ...] (top_k, default 5),
"windows": [{"start", "end", "labels"}] with timeline=1, "events": [{"label", "onset", "offset"}] with
events=1 (frame-wise models)}. What the scores mean (windows of the training clip, pooled) is explained
in bat/tagger.py. Bad input (empty body, undecodable or non-finite audio, bad query) gets HTTP 400 and
{"error": "one line"}; a body over --max-mb or audio longer than --max-seconds gets 413 (a compressed file
expands: the length is checked from its header before anything is decoded); a body without a
Content-Length (chunked) gets 411; a client silent for --timeout seconds (mid-body or idle) is dropped, and
so is one whose request (request line, headers and body) takes longer than --request-timeout from its first
byte (a slow trickle, each byte within --timeout): mid-body it gets 408 first.
The audio is decoded, resampled and scored block by block, so a request holds about 30 s of audio at a time.

One Tagger (one onnxruntime session) serves every request: ThreadingHTTPServer runs each request in its
own thread and InferenceSession.run is thread-safe, so concurrent requests share the loaded model.
Its onnxruntime threads follow the container's CPU quota (Kubernetes limits.cpu, docker --cpus) unless
--threads says otherwise: onnxruntime itself would count the whole node's cores and be throttled.
Why the standard library: nothing to install next to numpy, onnxruntime, soundfile and soxr; put a
reverse proxy (TLS, authentication, rate limits) in front of it for anything public.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from bat.audio import AudioError  # noqa: E402
from bat.tagger import Tagger, read_blocks  # noqa: E402


class BadRequest(ValueError):
    """Answered with HTTP 400 and the message."""


class TooLarge(ValueError):
    """Answered with HTTP 413 and the message."""


class Late(Exception):
    """A request not read whole within --request-timeout. Not a TimeoutError: http.server would catch that
    inside a request and drop the connection without the 408 a body read in time may still get."""


class DeadlineReader(io.RawIOBase):
    """A connection's bytes under rfile's buffer: each recv waits at most --timeout and, while a request is
    read, not past its deadline. A client trickling a byte every few seconds passes every recv's --timeout,
    so only a deadline on the whole request (line, headers, body) frees its thread; no watchdog thread or
    socket shutdown is needed, and a body cut off in time can still be answered 408."""

    def __init__(self, sock, idle: float):
        self.sock, self.idle, self.deadline = sock, idle, math.inf  # time.monotonic(); inf: between requests

    def readable(self):
        return True

    def readinto(self, buffer):
        wait = min(self.idle, self.deadline - time.monotonic())
        if wait <= 0:
            raise Late("the request took longer than --request-timeout")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            if wait < self.idle:  # the deadline came before --timeout of silence
                raise Late("the request took longer than --request-timeout") from None
            raise


def decode(body: bytes, tagger: Tagger, max_seconds: float):
    """Audio file bytes -> pieces of mono float32 at the model's rate (what bat.audio.load_audio would read,
    decoded block by block as the pieces are taken); the duration is checked from the header first."""
    if not body:
        raise BadRequest("empty body: POST the audio file's bytes")
    pieces, seconds = read_blocks(io.BytesIO(body), tagger.sample_rate, tagger.block_samples())
    if seconds > max_seconds:
        raise TooLarge(f"the audio lasts {seconds:.1f} s; this service takes at most {max_seconds:g} s (--max-seconds)")
    return pieces


def flag(query: dict, name: str) -> bool:
    value = query.get(name, ["0"])[-1].lower()
    if value not in ("0", "1", "true", "false", "yes", "no", ""):
        raise BadRequest(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "yes", "")


def answer(tagger: Tagger, pieces, query: dict) -> dict:
    try:
        top_k = int(query.get("top_k", ["5"])[-1])
    except ValueError:
        raise BadRequest("top_k must be an integer") from None
    if top_k < 1:
        raise BadRequest("top_k must be at least 1")
    timeline, events = flag(query, "timeline"), flag(query, "events")
    if events and not tagger.frame_wise:
        raise BadRequest("events need a frame-wise (sound event detection) model; use timeline=1")
    result = tagger.tag_stream(pieces)
    labels = lambda s: [{"label": l, "score": round(v, 6)} for l, v in tagger.top_k(s, top_k)]  # noqa: E731
    out = {"duration": round(result["duration"], 3), "labels": labels(result["scores"])}
    if timeline:
        out["windows"] = [{"start": round(a, 3), "end": round(b, 3), "labels": labels(s)}
                          for a, b, s in result["windows"]]
    if events:
        out["events"] = [{"label": l, "onset": on, "offset": off} for l, on, off in result["events"]]
    return out


class TagHandler(BaseHTTPRequestHandler):
    """One connection's requests. make_handler gives the class its tagger and limits; ThreadingHTTPServer makes
    one instance per connection, in its own thread."""
    protocol_version = "HTTP/1.1"
    tagger: Tagger
    max_bytes: int  # --max-mb
    max_seconds: float  # --max-seconds
    request_seconds: float  # --request-timeout
    # --timeout: a client that stops sending (a body shorter than its Content-Length, an idle keep-alive
    # connection) is dropped after this many seconds instead of holding its thread forever.
    timeout: float

    def setup(self):
        super().setup()
        self.rfile.close()  # the plain socket file: reads go through the deadline instead
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = math.inf  # the keep-alive wait for a request's first byte: --timeout alone
        try:
            self.rfile.peek(1)
            self.reader.deadline = time.monotonic() + self.request_seconds  # from that byte on: the whole request
            super().handle_one_request()  # drops a client silent for --timeout inside a request itself
        except (TimeoutError, Late) as e:  # idle before a request, or too slow before its body
            self.log_error("dropped: %s", e)
            self.close_connection = True

    def send_json(self, status: int, obj: dict):
        self.connection.settimeout(self.timeout)  # the answer is written under --timeout, not what the deadline left
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # an early answer: a client that pools connections must not reuse this one
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def answer_and_close(self, status: int, error: str, limit: int = 2**20):
        """An answer that ends the connection before its body is read (411, 413, 408). Then read and drop what
        the client is still sending (up to `limit` bytes, for at most --timeout): closing over unread bytes makes
        the kernel reset the connection, and a client still writing its body would get a broken pipe instead."""
        self.close_connection = True
        try:
            self.send_json(status, {"error": error})
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees its end
            end = time.monotonic() + self.timeout
            while limit > 0 and (wait := end - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                data = self.connection.recv(65536)
                if not data:
                    break
                limit -= len(data)
        except OSError:  # reset, timed out: nothing more to save
            pass

    def do_GET(self):
        if urlparse(self.path).path != "/health":
            return self.send_json(404, {"error": "not found: GET /health or POST /tag"})
        t = self.tagger
        self.send_json(200, {"model": os.path.basename(t.path), "labels": len(t.labels), "task": t.task,
                             "sample_rate": t.sample_rate, "device": t.device,
                             "window_seconds": None if t.window_samples >= 2**62  # whole recordings
                             else t.window_samples / t.sample_rate})

    def do_POST(self):
        try:
            self.post_tag()
        except Late as e:  # the body came too slowly: say so, then close
            self.answer_and_close(408, f"{e} ({self.request_seconds:g} s)")

    def post_tag(self):
        url = urlparse(self.path)
        if url.path != "/tag":
            return self.send_json(404, {"error": "not found: POST /tag"})
        if "Content-Length" not in self.headers:  # chunked: its unread chunks would parse as the next request
            return self.answer_and_close(411, "send the body with a Content-Length (not chunked)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if not 0 <= length <= self.max_bytes:  # not read: the answer, then what the client still sends is dropped
            return self.answer_and_close(413 if length > 0 else 400, f"body must be at most {self.max_bytes} bytes "
                                         "with a Content-Length", limit=4 * self.max_bytes)
        body = self.rfile.read(length)
        try:
            pieces = decode(body, self.tagger, self.max_seconds)
            self.send_json(200, answer(self.tagger, pieces, parse_qs(url.query)))
        except TooLarge as e:
            self.send_json(413, {"error": str(e)})
        except (BadRequest, AudioError, ValueError) as e:
            self.send_json(400, {"error": " ".join(str(e).split())})
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails, the service goes on
            self.send_json(500, {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})

    def log_message(self, fmt, *args):  # one line per request on stderr, without the default's noise
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def make_handler(tagger: Tagger, max_bytes: int, seconds: float = 60.0, max_seconds: float = 600.0,
                 request_seconds: float = 300.0):
    """The handler class serving `tagger` under these limits (--max-mb in bytes, --timeout, --max-seconds,
    --request-timeout)."""
    return type("Handler", (TagHandler,), dict(tagger=tagger, max_bytes=max_bytes, timeout=seconds,
                                                 max_seconds=max_seconds, request_seconds=request_seconds))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="MODEL.onnx written by export.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads (default 0: automatic, one per CPU this process may use where "
                        "a container's CPU quota or an affinity mask limits them, else onnxruntime's own choice)")
    p.add_argument("--max-mb", type=float, default=100.0, help="largest accepted body in MB (default 100)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="longest accepted audio in seconds, read from the file's header (default 600)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a client may stay silent (mid-body or idle) before its connection is closed")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request (request line, headers and body) may take from its first byte, however "
                        "steadily it trickles in (default 300); mid-body the client gets 408, then it is closed")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1  # the machine's, not the usable CPUs: a bound on typos, not a default
    for bad, rule in ((not 0 <= args.port <= 65535, "--port must be in 0..65535"),
                      (not args.max_mb > 0, "--max-mb must be positive"),
                      (not args.max_seconds > 0, "--max-seconds must be positive"),
                      (not 0 <= args.threads <= 4 * cores, f"--threads must be in 0..{4 * cores} (0: automatic; "
                                                           f"this machine has {cores} cores)"),
                      (not 0 < args.timeout < 1e6, "--timeout must be in (0, 1e6) s"),
                      (not 0 < args.request_timeout < 1e6, "--request-timeout must be in (0, 1e6) s")):
        if bad:
            p.error(rule)
    try:
        tagger = Tagger(args.model, args.device, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "scores" not in tagger.outputs:
        print(f"error: {args.model}: encoder-only export (no classifier head): nothing to tag", file=sys.stderr)
        return 2
    if tagger.notice:
        print(tagger.notice, file=sys.stderr)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(tagger, int(args.max_mb * 2**20), args.timeout,
                                                                         args.max_seconds, args.request_timeout))
    server.daemon_threads = True  # a stuck client never keeps the process alive at shutdown
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port} (POST /tag, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
