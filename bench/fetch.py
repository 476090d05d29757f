"""Reading the images that rows name by path or URL: the CPU stage's reader vs the one before it.

    .venv/bin/python bench/fetch.py [--images 128] [--kib 150] [--latency-ms 0 30] [--rounds 3]

Two stores on loopback: moto's S3 server (s3fs, as `s3://` rows are read) and a plain HTTP server
that waits `--latency-ms` before each answer (what a remote object store's first byte costs; S3
in-region is typically 10-50 ms). Three readers over the same block of `--images` distinct files:

- before: what the stage did until commit fdd978d - a new filesystem instance for each image (for
  s3fs a new client: credentials, connection pool) and one read at a time;
- 1 thread: today's ImageFetcher with one thread (one shared filesystem, reads in turn);
- N threads: today's default (`--fetch-threads`, 16).

Every reader's bytes are checked equal to the files'. Best of `--rounds`; ratios against "before".

Then S3 with `--latency-ms` a request (a client-side delay before each request is sent; moto
itself answers at once): today's ranged GET of each file against a whole-object read, for which
s3fs first sends a HEAD for the object's size (what the fetcher did until the byte limit).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.linear import cpu_name  # noqa: E402
from pipeline.fetch import ImageFetcher  # noqa: E402
from pipeline.storage import fsspec_fs, reader_fs  # noqa: E402


def read_before(urls: list[str]) -> list[bytes]:
    out = []
    for url in urls:
        fs, path = fsspec_fs(url)
        with fs.open(path, "rb") as f:
            out.append(f.read())
    return out


def slow_http_server(files: dict[str, bytes], latency_s: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency_s)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self):      # fsspec's open() asks for the size first
            time.sleep(latency_s)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256      # the default backlog (5) drops concurrent connects: 1 s SYN retries

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def moto_s3(files: dict[str, bytes]) -> tuple[list[str], object]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    fs, _ = fsspec_fs("s3://bench")
    fs.mkdir("bench")
    for name, body in files.items():
        fs.pipe(f"bench{name}", body)
    return [f"s3://bench{name}" for name in files], server


def best_rate(read, urls: list[str], expected: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        got = read(urls)
        best = min(best, time.perf_counter() - start)
        if got != expected:
            raise AssertionError("a reader returned other bytes than the files hold")
    return len(urls) / best


def bench_store(store: str, urls: list[str], expected: list[bytes], threads: int, rounds: int) -> None:
    one, many = ImageFetcher(threads=1), ImageFetcher(threads=threads)
    rates = {"before": best_rate(read_before, urls, expected, rounds),
             "1 thread": best_rate(one.fetch, urls, expected, rounds),
             f"{threads} threads": best_rate(many.fetch, urls, expected, rounds)}
    base = rates["before"]
    print(f"| {store} | " + " | ".join(f"{r:,.0f} img/s ({r / base:.1f}x)" for r in rates.values()) + " |")
    one.close()
    many.close()


class WholeObjectFetcher(ImageFetcher):
    def _read_once(self, url: str) -> bytes:
        fs, path = reader_fs(url, self.storage_options)
        return fs.cat_file(path, timeout=self.timeout_s)


def bench_s3_round_trips(urls: list[str], expected: list[bytes], latency_ms: float, threads: int,
                         rounds: int) -> None:
    async def delay(**_):
        await asyncio.sleep(latency_ms / 1000)

    fs, path = reader_fs(urls[0])
    fs.cat_file(path)                   # connects: the client whose requests are delayed
    fs.s3.meta.events.register("before-send.s3", delay)
    for n in (1, threads):
        whole, ranged = WholeObjectFetcher(threads=n), ImageFetcher(threads=n)
        before, now = (best_rate(f.fetch, urls, expected, rounds) for f in (whole, ranged))
        print(f"| S3, {latency_ms:g} ms a request, {n} thread{'s' * (n > 1)} | {before:,.0f} img/s | "
              f"{now:,.0f} img/s ({now / before:.1f}x) |")
        whole.close()
        ranged.close()
    fs.s3.meta.events.unregister("before-send.s3", delay)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--kib", type=int, default=150, help="bytes of each file (a 1024x768 JPEG is ~100-200 KiB)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0, 30])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    files = {f"/img/{i}.jpg": os.urandom(args.kib * 1024) for i in range(args.images)}
    expected = list(files.values())
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.images} files of "
          f"{args.kib} KiB; best of {args.rounds}\n")
    print(f"| store | before | 1 thread | {args.threads} threads |\n|---|---|---|---|")
    urls, moto = moto_s3(files)
    bench_store("S3 (moto, loopback)", urls, expected, args.threads, args.rounds)
    for latency in args.latency_ms:
        server = slow_http_server(files, latency / 1000)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        bench_store(f"HTTP, {latency:g} ms a request", [base + name for name in files], expected,
                    args.threads, args.rounds)
        server.shutdown()
    print("\n| S3 reads | whole object (HEAD + GET) | ranged GET |\n|---|---|---|")
    for latency in [ms for ms in args.latency_ms if ms > 0]:
        bench_s3_round_trips(urls, expected, latency, args.threads, args.rounds)
    moto.stop()


if __name__ == "__main__":
    main()
