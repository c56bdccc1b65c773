"""The dataset downloader (components/data/sources/download.py) against a loopback HTTP server:
progress, retries after failures and a body cut off midway, the sha256 check (nothing is kept on
a mismatch), and the recorded digests a later download must match. No internet."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from components.data.sources import download as dl


class _Server:
    """Serves ``self.files`` (path -> bytes); ``self.plan`` lists what the next requests get:
    an HTTP status to fail with, "cut" (half the body, then the connection closes) or "ok"."""

    def __init__(self):
        self.files, self.headers, self.plan, self.requests = {}, {}, [], 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests += 1
                step = outer.plan.pop(0) if outer.plan else "ok"
                body = outer.files.get(self.path)
                if body is None or isinstance(step, int):
                    self.send_response(404 if body is None else step)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for k, v in outer.headers.get(self.path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body if step == "ok" else body[:len(body) // 2])
                if step == "cut":
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def test_a_download_is_retried_checked_and_recorded(server, tmp_path, capsys):
    body = bytes(range(256)) * 4096  # 1 MiB
    server.files["/data.bin"] = body
    server.plan = [503, "cut", "ok"]  # a server error, then a body cut off midway, then the file
    path = dl.fetch(f"{server.url}/data.bin", tmp_path / "data.bin", retries=3, progress=True)
    assert path.read_bytes() == body and server.requests == 3
    assert not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / dl.SUMS).read_text() == f"{hashlib.sha256(body).hexdigest()}  data.bin\n"
    assert "data.bin" in capsys.readouterr().err  # the progress bar

    # The publisher's file changed: the next download is refused and the kept file is untouched.
    server.files["/data.bin"] = body[::-1]
    with pytest.raises(dl.DownloadError, match="sha256 .* is not the expected"):
        dl.fetch(f"{server.url}/data.bin", tmp_path / "data.bin", retries=0, progress=False)
    assert path.read_bytes() == body and not (tmp_path / "data.bin.part").exists()


def test_an_expected_digest_is_checked_and_retries_end(server, tmp_path):
    server.files["/a.bin"] = b"abc"
    with pytest.raises(dl.DownloadError, match="sha256"):
        dl.fetch(f"{server.url}/a.bin", tmp_path / "a.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing kept, nothing recorded
    good = hashlib.sha256(b"abc").hexdigest()
    assert dl.fetch(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=good.upper(), progress=False).read_bytes() == b"abc"
    server.plan = [503] * 10
    with pytest.raises(dl.DownloadError, match="b.bin"):
        dl.fetch(f"{server.url}/b.bin", tmp_path / "b.bin", retries=1, progress=False)
    with pytest.raises(dl.DownloadError, match="404"):
        dl.fetch(f"{server.url}/missing.bin", tmp_path / "m.bin", retries=0, progress=False)


def test_a_gzip_file_labelled_content_encoding_gzip_is_kept_as_published(server, tmp_path):
    """Some servers send .json.gz with Content-Encoding: gzip; the file must stay the published
    gzip bytes (not silently decompressed under a .gz name) and its length must not look cut off."""
    import gzip

    body = gzip.compress(b'{"reviewerID": "A1", "asin": "B1"}\n' * 1000)
    server.files["/reviews.json.gz"] = body
    server.headers["/reviews.json.gz"] = {"Content-Encoding": "gzip"}
    path = dl.fetch(f"{server.url}/reviews.json.gz", tmp_path / "reviews.json.gz", retries=0, progress=False)
    assert path.read_bytes() == body


def test_a_zip_dataset_is_unpacked_flat(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-tiny/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n")
        z.writestr("ml-tiny/movies.csv", "movieId,title,genres\n1,Toy Story (1995),Animation\n")
    server.files["/ml-tiny.zip"] = buf.getvalue()
    monkeypatch.setitem(dl.DATASETS, "ml-tiny", {"source": "movielens", "zip": f"{server.url}/ml-tiny.zip"})
    out = dl.download("ml-tiny", tmp_path, progress=False)
    assert {p.name for p in out.iterdir()} == {"ratings.csv", "movies.csv", "ml-tiny.zip", dl.SUMS}
    with pytest.raises(KeyError, match="unknown dataset"):
        dl.download("ml-nope", tmp_path)
