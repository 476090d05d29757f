"""Reading the images that rows name by path or URL: a real HTTP server on loopback (fsspec's
http filesystem), real local files, and the preprocessing stage over both (no Ray needed)."""
import base64
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from pipeline import PipelineConfig
from pipeline.fetch import ImageFetcher, is_range_not_satisfiable, is_transient, redact_url
from pipeline.storage import redact_urls
from pipeline.preprocess import Preprocess
from pipeline.rows import RowError
from pipeline.storage import reader_fs
from tests.pipeline.helpers import png, write_parquet


class ImageServer(ThreadingHTTPServer):
    """Serves `files`, honouring a GET's byte range (as object stores and most servers do) unless
    `ignores_range`; a path in `failures` answers that status its first n times; counts GETs and
    the bytes sent per path and the most requests it ever had in progress at once (each takes
    `delay_s`, or its path's entry in `delays`). A client that gives up or hangs up can return before
    the handler has counted: `wait_for` waits for a count (`gets`: requests begun, `ended`: answered)."""

    daemon_threads = True
    request_queue_size = 64      # the default backlog (5) drops concurrent connects (1 s SYN retries)

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, tuple[int, int]] = {}
        self.gets: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.ignores_range = False
        self.delays: dict[str, float] = {}
        self.delay_s, self.in_flight, self.max_in_flight = 0.0, 0, 0
        self.lock = threading.Lock()
        self.ended: dict[str, int] = {}
        self.counted = threading.Condition(self.lock)
        self.authorizations: list[str | None] = []

    def wait_for(self, counts: dict[str, int], path: str, requests: int = 1) -> None:
        with self.counted:
            assert self.counted.wait_for(lambda: counts.get(path, 0) >= requests, timeout=30), (path, counts)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            self.serve()
        finally:
            with self.server.counted:
                self.server.ended[self.path] = self.server.ended.get(self.path, 0) + 1
                self.server.counted.notify_all()

    def serve(self):
        server: ImageServer = self.server
        with server.lock:
            server.gets[self.path] = server.gets.get(self.path, 0) + 1
            server.authorizations.append(self.headers.get("Authorization"))
            server.counted.notify_all()
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            status, times = server.failures.get(self.path, server.failures.get(self.path.split("?")[0], (200, 0)))
            failing = server.gets[self.path] <= times
        time.sleep(server.delays.get(self.path, server.delay_s))
        with server.lock:
            server.in_flight -= 1
        if failing or self.path not in server.files:
            self.send_error(status if failing else 404)
            return
        body, status = server.files[self.path], 200
        first, last = self.byte_range()
        if first is not None and not server.ignores_range:
            if first >= len(body):
                self.send_error(416)
                return
            body, status = body[first:last + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:            # in pieces, counting what leaves before a reader that has enough hangs up
            for start in range(0, len(body), 1 << 16):
                self.wfile.write(body[start:start + (1 << 16)])
                server.sent[self.path] = server.sent.get(self.path, 0) + len(body[start:start + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def byte_range(self) -> tuple[int | None, int]:
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes="):
            return None, 0
        first, last = spec[len("bytes="):].split("-")
        return int(first), int(last) if last else 1 << 62

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetcher(**kw) -> ImageFetcher:
    return ImageFetcher(None, backoff_s=0.01, **kw)


def test_rows_get_their_bytes_or_an_error_naming_the_url(server, tmp_path):
    a, b = png(20, 10, seed=1), png(8, 30, seed=2)
    server.files = {"/a.png": a, "/b.png": b}
    local = tmp_path / "c[1].png"              # glob characters are a name, not a pattern
    local.write_bytes(png(5, 5, seed=3))
    values = [server.url("/a.png"), {"bytes": b"inline", "path": "x.png"}, {"bytes": None, "path": server.url("/b.png")},
              str(local), server.url("/gone.png"), None, 7, str(tmp_path / "missing.png"), b"raw"]
    out = fetcher().fetch(values)
    assert out[:4] == [a, b"inline", b, local.read_bytes()] and out[-1] == b"raw"
    errors = {i: str(out[i]) for i in (4, 5, 6, 7)}
    assert all(isinstance(out[i], RowError) for i in errors)
    assert "/gone.png" in errors[4] and "FileNotFoundError" in errors[4]
    assert errors[5] == "image is null" and "unsupported type int" in errors[6]
    assert "missing.png" in errors[7]
    assert server.gets["/gone.png"] == 1          # a missing file is not asked for again


def test_a_file_past_the_byte_limit_is_an_error_read_no_further(server, tmp_path):
    """A video or an archive named as an image costs the limit's bytes, not its size; an empty file
    (a ranged read of it is HTTP 416) is empty data for the decoder to name, not a failed read."""
    small, big = png(9, 9), png(64, 64, seed=5) + bytes(5000)
    server.files = {"/small.png": small, "/big.png": big, "/empty.png": b""}
    (tmp_path / "big.png").write_bytes(big)
    limit = len(small) + 10
    out = fetcher(max_bytes=limit).fetch([server.url(p) for p in ("/small.png", "/big.png", "/empty.png")]
                                         + [str(tmp_path / "big.png")])
    assert out[:1] == [small] and out[2] == b""
    for error, name in ((out[1], server.url("/big.png")), (out[3], str(tmp_path / "big.png"))):
        assert str(error) == f"image file {name!r} is larger than the limit of {limit} bytes (max_image_bytes)"
    server.wait_for(server.ended, "/big.png")
    assert server.sent["/big.png"] == limit + 1 and server.gets == {"/small.png": 1, "/big.png": 1, "/empty.png": 1}
    server.ignores_range = True         # a server that sends the whole file anyway: refused, read no further
    server.files["/huge.png"], server.sent = bytes(64 << 20), {}
    assert isinstance(fetcher(max_bytes=limit).fetch([server.url("/huge.png")])[0], RowError)
    server.wait_for(server.ended, "/huge.png")
    assert server.sent["/huge.png"] < 24 << 20          # what the sockets' buffers took, not the 64 MiB
    assert fetcher().fetch([server.url("/big.png")]) == [big]       # 256 MiB by default


def test_transient_failures_are_retried_permanent_ones_are_not(server):
    image = png(12, 12)
    server.files = {"/flaky.png": image, "/down.png": image, "/forbidden.png": image, "/busy.png": image}
    server.failures = {"/flaky.png": (503, 2), "/down.png": (502, 99), "/forbidden.png": (403, 99),
                       "/busy.png": (429, 1)}
    out = fetcher(attempts=3).fetch([server.url(p) for p in ("/flaky.png", "/down.png", "/forbidden.png",
                                                              "/busy.png")])
    assert out[0] == image and out[3] == image
    assert isinstance(out[1], RowError) and "after 3 attempts" in str(out[1]) and "502" in str(out[1])
    assert isinstance(out[2], RowError) and "403" in str(out[2]) and "attempts" not in str(out[2])
    assert server.gets == {"/flaky.png": 3, "/down.png": 3, "/forbidden.png": 1, "/busy.png": 2}


def test_a_read_that_hangs_is_cut_off_and_tried_again(server):
    server.files = {"/hang.png": png(7, 7), "/ok.png": png(8, 8)}
    server.delays = {"/hang.png": 30.0}
    start = time.perf_counter()
    out = fetcher(attempts=2, timeout_s=2.0).fetch([server.url("/hang.png"), server.url("/ok.png")])
    assert time.perf_counter() - start < 15
    assert out[1] == server.files["/ok.png"]
    assert isinstance(out[0], RowError) and "after 2 attempts" in str(out[0]) and "no answer within 2 s" in str(out[0])
    server.wait_for(server.gets, "/hang.png", 2)
    assert server.gets["/hang.png"] == 2


def test_a_file_named_by_several_rows_is_read_once(server):
    server.files = {"/same.png": png(9, 9)}
    out = fetcher().fetch([server.url("/same.png")] * 5)
    assert out == [server.files["/same.png"]] * 5 and server.gets == {"/same.png": 1}


def test_a_block_is_read_concurrently(server):
    server.files = {f"/{i}.png": png(6, 6, seed=i) for i in range(8)}
    server.delay_s = 0.2
    out = fetcher(threads=8).fetch([server.url(f"/{i}.png") for i in range(8)])
    assert out == [server.files[f"/{i}.png"] for i in range(8)]
    assert server.max_in_flight > 1
    server.max_in_flight = 0
    fetcher(threads=1).fetch([server.url(f"/{i}.png") for i in range(3)])
    assert server.max_in_flight == 1


def test_one_filesystem_per_protocol_and_options():
    first, _ = reader_fs("memory://a/x.png")
    assert reader_fs("memory://b/y.png")[0] is first
    assert reader_fs("memory://b/y.png", {"x": 1})[0] is not first


def test_which_errors_are_worth_another_try():
    class Status(Exception):
        def __init__(self, status):
            self.status = status

    import aiohttp
    from botocore import exceptions as boto

    assert all(is_transient(e) for e in (TimeoutError(), ConnectionResetError(), OSError("EIO"), Status(503),
                                           Status(429), Status(408), aiohttp.ServerDisconnectedError(),
                                           aiohttp.ClientPayloadError(), boto.EndpointConnectionError(endpoint_url="x"),
                                           boto.ReadTimeoutError(endpoint_url="x")))
    assert not any(is_transient(e) for e in (FileNotFoundError(), PermissionError(), Status(404), Status(403),
                                               ValueError("Protocol not known"), ImportError("gcsfs"),
                                               boto.NoCredentialsError(), RuntimeError()))
    coded = Status(0)
    coded.code = 416                # gcsfs' HttpError
    empty = (Status(416), coded, OSError(22, "The requested range is not satisfiable"))      # aiohttp, gcsfs, s3fs
    assert all(map(is_range_not_satisfiable, empty))
    assert not any(map(is_range_not_satisfiable, (Status(404), OSError("EIO"), ValueError("not satisfiable"))))


def test_a_transport_module_another_thread_is_still_importing_is_no_failure(monkeypatch):
    """A local read that fails while a thread beside it imports aiohttp (for an http row) sees aiohttp
    in sys.modules without its classes yet: still a plain, permanent failure."""
    import types

    monkeypatch.setitem(sys.modules, "aiohttp", types.ModuleType("aiohttp"))
    monkeypatch.setitem(sys.modules, "botocore.exceptions", types.ModuleType("botocore.exceptions"))
    assert not is_transient(FileNotFoundError()) and is_transient(TimeoutError())


def test_preprocess_stage_reads_urls_and_keeps_failures_as_row_errors(server, checkpoint):
    image = png(40, 30, seed=4)
    server.files = {"/ok.png": image}
    server.failures = {"/ok.png": (500, 1)}
    stage = Preprocess(PipelineConfig(model=str(checkpoint), max_new_tokens=4, fetch_attempts=2))
    stage.fetcher.backoff_s = 0.01
    batch = pa.table({"id": [1, 2, 3], "image": [server.url("/ok.png"), server.url("/nope.png"), server.url("/ok.png")],
                      "question": ["What?", "What?", "Where?"]})
    out = stage(batch).to_pylist()           # rows 1 and 3 share the image: one row, frames once
    inline = stage(pa.table({"id": [4], "image": [image], "question": ["What?"]})).to_pylist()[0]
    assert out[0]["id"] == [1, 3] and out[0]["error"] == [None, None]
    assert out[0]["input_ids"][0] == inline["input_ids"][0]
    assert out[0]["frames"] == inline["frames"] and out[0]["image_key"] == inline["image_key"]
    assert out[1]["id"] == [2] and "/nope.png" in out[1]["error"][0]
    assert out[1]["error"][0].startswith("read image: RowError: cannot read image")
    assert server.gets == {"/ok.png": 2, "/nope.png": 1}


def test_the_byte_limit_reaches_the_stage_for_files_and_inline_bytes(server, checkpoint):
    image = png(40, 30, seed=6)
    server.files = {"/a.png": image}

    def error(limit: int, cell) -> str | None:
        stage = Preprocess(PipelineConfig(model=str(checkpoint), max_new_tokens=4, max_image_bytes=limit))
        return stage(pa.table({"id": [1], "image": [cell], "question": ["What?"]})).column("error")[0][0].as_py()

    assert f"is larger than the limit of {len(image) - 1} bytes" in error(len(image) - 1, server.url("/a.png"))
    assert error(len(image) - 1, image) == (f"preprocess: ImageTooLargeError: image data is {len(image)} bytes, "
                                            f"more than the limit of {len(image) - 1}")
    assert error(len(image), server.url("/a.png")) is None and error(len(image), image) is None


def test_a_row_of_more_images_than_the_context_holds_is_refused_unread(server, checkpoint):
    stage = Preprocess(PipelineConfig(model=str(checkpoint), max_new_tokens=4))
    stage.encoder.max_length = 100
    most = 100 // stage.encoder.processor.image_seq_len
    server.files = {f"/{i}.png": png(16, 16, seed=7) for i in range(most + 2)}
    many, one = [server.url(f"/{i}.png") for i in range(1, most + 2)], [server.url("/0.png")]
    out = stage(pa.table({"id": [1, 2], "image": [many, one], "question": ["Which?", "What?"]})).to_pylist()
    errors = {row["id"][0]: row["error"][0] for row in out}
    assert errors == {1: f"read image: RowError: more images than the model's context holds (the row has {most + 1}; "
                         f"its 100 tokens hold at most {most})", 2: None}
    assert server.gets == {"/0.png": 1}


def test_an_error_of_one_image_of_several_names_which(checkpoint):
    """[A, <html>, A] said only 'not an image', [A, None, A] what a null cell says; too many images
    were counted as one kind a count ('the row has 129 images', 'the row has 2000 images')."""
    from pipeline.rows import error_kind

    stage = Preprocess(PipelineConfig(model=str(checkpoint), max_new_tokens=4))
    good = png(16, 16, seed=7)
    rows = [[good, b"<html>404</html>", good], [good, None], [None], [good, good]]
    out = stage(pa.table({"id": [1, 2, 3, 4], "image": rows, "question": ["Which?"] * 4})).to_pylist()
    errors = {row["id"][k]: row["error"][k] for row in out for k in range(len(row["id"]))}
    assert errors[1].startswith("preprocess: NotAnImageError: not an image") and errors[1].endswith("(image 2 of 3)")
    assert errors[2] == "read image: RowError: image is null (image 2 of 2)"
    assert errors[3] == "read image: RowError: image is null" and errors[4] is None
    assert {error_kind(errors[2]), error_kind(errors[3])} == {"read image: image is null"}
    stage.encoder.max_length = 100
    counts = [error_kind(stage(pa.table({"id": [1], "image": [[good] * n], "question": ["?"]})).to_pylist()[0]
                         ["error"][0]) for n in (60, 61)]
    assert counts == ["read image: more images than the model's context holds"] * 2


def test_error_rows_do_not_show_credentials_in_urls(server):
    signed = server.url("/private.png?X-Amz-Credential=AKIA123&X-Amz-Signature=abc123&X-Amz-Expires=60&v=2")
    with_user = signed.replace("http://", "http://alice:hunter2@")
    # a real SigV4 credential holds %2F, which the HTTP client quotes back as "/" in its own message
    sigv4 = signed.replace("AKIA123", "AKIA123%2F20260101%2Fus-east-1%2Fs3%2Faws4_request")
    server.failures["/private.png"] = (403, 99)     # an expired signature: 403, whose error quotes the URL
    for url in (signed, with_user, sigv4):
        error = str(fetcher().fetch([url])[0])
        assert "private.png" in error and "X-Amz-Expires=***" in error and "v=***" in error
        assert not any(secret in error for secret in ("AKIA123", "abc123", "hunter2", "alice"))
    assert redact_url("s3://bucket/a/b.png") == "s3://bucket/a/b.png"
    # every query value (a secret's parameter may have any name: pwd, session, sv...) and the fragment
    assert redact_url("https://h/x.png?pwd=t&w=3#access_token=z") == "https://h/x.png?pwd=***&w=***#***"
    assert redact_url("/data/a b?c=d#e") == "/data/a b?c=d#e"                 # a local path stays as it is
    assert redact_urls("input 'https://a:pw@h/x?token=t' (see http://h/y?key=k).") == \
        "input 'https://***@h/x?token=***' (see http://h/y?key=***)."
    # user:password@ quoted without its scheme (botocore's bucket-name error); times and e-mails stay
    assert redact_urls('Invalid bucket name "AKIA1:SE/CR+ET@bucket" at 12:30 for a@b.org') == \
        'Invalid bucket name "***@bucket" at 12:30 for a@b.org'


def test_relative_paths_are_read_under_the_root(server, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"local")
    server.files = {"/data/pics/a.png": b"remote"}
    absolute = tmp_path / "pics" / "a.png"
    assert fetcher(root=str(tmp_path)).fetch(["pics/a.png", str(absolute)]) == [b"local", b"local"]
    remote = fetcher(root=server.url("/data/"))
    assert remote.fetch(["pics/a.png", server.url("/data/pics/a.png")]) == [b"remote", b"remote"]
    assert server.gets == {"/data/pics/a.png": 1}          # one file, whichever way the rows name it
    assert "/data/pics/b.png" in str(remote.fetch(["pics/b.png"])[0])     # the error names what was tried
    # ./ and ../ under a URL root as under a local one (an object key has no such parts)
    assert [fetcher(root="s3://b/coco/val/").resolve(p) for p in ("./a.png", "../x/a.png")] == [
        "s3://b/coco/val/a.png", "s3://b/coco/x/a.png"]


def test_the_jobs_storage_options_go_to_its_own_web_host_only(server, tmp_path):
    """They went to every host a row named: an Authorization header too, and `{"anon": true}` (an S3
    setting, README's own example) failed every https image in TypeError."""
    server.files = {"/data/a.png": b"image"}
    url = server.url("/data/a.png")
    assert ImageFetcher({"anon": True}, backoff_s=0.01).fetch([url]) == [b"image"]
    secret = {"headers": {"Authorization": "Bearer SECRET"}}
    assert ImageFetcher(secret, root=str(tmp_path), backoff_s=0.01).fetch([url]) == [b"image"]
    assert ImageFetcher(secret, root=server.url("/data/"), backoff_s=0.01).fetch(["a.png"]) == [b"image"]
    assert server.authorizations == [None, None, "Bearer SECRET"]


def test_a_pipe_or_a_device_is_no_image_and_no_wait(tmp_path):
    """A row naming a FIFO waited for a writer for ever (no timeout applies to a local read): the job hung."""
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    out = fetcher().fetch([str(tmp_path / "pipe"), "/dev/zero", str(tmp_path)])
    assert all("not a regular file" in str(e) for e in out) and time.monotonic() - started < 5


def test_data_urls_carry_their_bytes():
    """RFC 2397, as OpenAI-style messages and scraped pages hold images: base64 (whitespace and
    percent-escapes inside it allowed) or percent-encoded; a malformed one is its row's error."""
    data = png(6, 4, seed=5)
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i:i + 20] for i in range(0, len(encoded), 20)).replace("+", "%2B")
    values = [f"data:image/png;base64,{encoded}", f"DATA:image/png;BASE64,{wrapped}", "data:,a%20b",
              {"bytes": None, "path": f"data:image/png;base64,{encoded}"},
              "data:image/png;base64,@@@not-base64", "data:image/png;base64"]
    out = fetcher().fetch(values)
    assert out[:4] == [data, data, b"a b", data]
    assert "invalid base64" in str(out[4]) and "no ','" in str(out[5])


def test_bare_base64_images_carry_their_bytes_and_strings_that_name_no_file_fail_at_once(tmp_path):
    """Benchmarks from TSV files keep images as bare base64 (the library's processor reads them, as the
    reference's): a JPEG's ('/9j/...') was read as an absolute path, tried three times ('File name too
    long') and quoted whole in its error (60 KB); an empty path was the image root's IsADirectoryError."""
    from io import BytesIO

    from PIL import Image

    jpeg = BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")
    images = [png(6, 4, seed=5), jpeg.getvalue()]
    (tmp_path / "iVBORw0KGgo.png").write_bytes(b"a file")     # a path that starts like a PNG's base64 is a path
    text = "\n".join(base64.b64encode(images[0]).decode()[i:i + 76] for i in range(0, 200, 76))
    values = [base64.b64encode(images[0]).decode(), base64.b64encode(images[1]).decode(), "iVBORw0KGgo.png", "",
              "  ", text[:-3] + "@@@", "x" * 5000]
    started = time.monotonic()
    out = fetcher(root=str(tmp_path)).fetch(values)
    assert out[:3] == [*images, b"a file"] and time.monotonic() - started < 1
    assert [str(e) for e in out[3:5]] == ["image path is empty"] * 2
    assert str(out[5]).startswith("image string starts as a PNG image in base64 but is not valid base64")
    assert str(out[6]) == f"image string of 5000 characters is not a path or URL, nor an image in base64 (it starts " \
                          f"{'x' * 40!r})"
    assert not is_transient(OSError(36, "File name too long")) and not is_transient(OSError(40, "Too many levels"))


def test_file_urls_are_local_paths_percent_decoded(tmp_path):
    """Path.as_uri() writes a space as %20 and non-ASCII letters as UTF-8 escapes."""
    image = tmp_path / "my pics" / "café 1.png"
    image.parent.mkdir()
    image.write_bytes(b"local")
    root = fetcher(root=image.parent.as_uri())
    out = root.fetch([image.as_uri(), "café 1.png", f"file://localhost{image}", "file://elsewhere/x.png"])
    assert out[:3] == [b"local"] * 3
    assert "names another host" in str(out[3])


def test_jobs_read_relative_paths_from_the_input_folder(tmp_path):
    from pipeline.io import input_folder
    from pipeline.job import with_image_root

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.parquet").write_bytes(b"")
    folder = str(tmp_path / "data")
    assert input_folder(folder) == input_folder(folder + "/rows.parquet") == input_folder(folder + "/*.parquet") == folder
    config = PipelineConfig(model="m")
    assert with_image_root(config, folder + "/rows.parquet").image_root == folder
    assert with_image_root(PipelineConfig(model="m", image_root="s3://b/imgs"), folder).image_root == "s3://b/imgs"


def test_a_missing_image_root_is_named_before_any_work(checkpoint, tmp_path):
    from pipeline import run_job
    from pipeline.checks import check_image_root

    check_image_root(str(tmp_path), None)
    check_image_root("https://example.invalid/images/", None)     # HTTP cannot list folders: not asked
    write_parquet(tmp_path / "in.parquet", [{"image": "a.png", "question": "?"}])
    config = PipelineConfig(model=str(checkpoint), image_root=str(tmp_path / "imgs"))
    with pytest.raises(FileNotFoundError, match="image root .*imgs.*: no such folder"):
        run_job(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config)   # no cluster: it fails first
    assert not (tmp_path / "out").exists()


def test_error_rows_are_counted_by_stage_and_cause(server):
    from pipeline.rows import error_kind, error_message

    server.failures = {"/busy.png": (503, 9)}
    read = [error_message("read image", e) for e in fetcher(attempts=2).fetch(
        [server.url("/gone.png"), server.url("/busy.png"), None])]
    assert [error_kind(m) for m in read] == ["read image: FileNotFoundError", "read image: ClientResponseError",
                                             "read image: image is null"]
    assert error_kind("preprocess: ImageDecodeError: corrupt image header: OSError: Truncated") == \
        "preprocess: ImageDecodeError"                      # what ended the row, not what it wrapped
    assert error_kind("prepare: RowError: the row's settings name 'bogus', not one a row may set (it may: a)") == \
        "prepare: the row's settings name '…', not one a row may set"      # its value left out, not its cause
    assert error_kind("messages: RowError: a message's text contains the image marker '<image>'; it would shift the "
                      "image tokens, so the row is refused") == \
        "messages: a message's text contains the image marker '…'"         # its first clause, not cut at 100


def test_an_input_the_server_refuses_is_one_line_without_its_signature(server, checkpoint, tmp_path):
    """An expired pre-signed Parquet URL (HTTP 403): a PermissionError naming it, its secrets
    redacted (it was a traceback quoting the signature)."""
    from pipeline import PipelineConfig
    from pipeline.job import prepare_job

    server.failures["/rows.parquet"] = (403, 99)
    signed = server.url("/rows.parquet?X-Amz-Credential=AKIA9%2F2026%2Fus&X-Amz-Signature=SIG999")
    with pytest.raises(PermissionError, match="cannot be read") as refused:
        prepare_job(signed, str(tmp_path / "out"), PipelineConfig(model=str(checkpoint)))
    assert "SIG999" not in str(refused.value) and "AKIA9" not in str(refused.value)
