"""http(s) sources against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.data.factories import config, fast_limits, jpeg, png, tar_bytes, zip_bytes
from trainer.data.errors import SourceError
from trainer.data.prepare import prepare_dataset
from trainer.utils.download import DownloadError, download, redact_url


def _prepare(sandbox, sources, limits=None, allow_local=True, **overrides):
    return prepare_dataset(config(sources, **overrides), sandbox.work_dir, limits=limits or fast_limits(),
                           allow_local=allow_local)


def test_archives_and_single_images_over_http(sandbox, http_server):
    archive = http_server.add("/sets/photos.zip", zip_bytes({"a.png": png(1), "a.txt": b"a red bicycle",
                                                             "b.jpg": jpeg(2)}))
    tarball = http_server.add("/download", tar_bytes({"c.png": png(3)}),
                              headers={"Content-Disposition": 'attachment; filename="more.tar.gz"'})
    single = http_server.add("/img", png(4), headers={"Content-Type": "image/png"})
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, f"{archive} | {tarball}\n{single}", allow_local=False)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 4
    assert dataset.samples[0].caption == "TOK, a red bicycle"
    assert dataset.samples[0].source == f"a.png (in {archive})"
    assert dataset.samples[2].source == f"c.png (in {tarball})"
    assert dataset.samples[3].source == single


def test_caption_table_given_as_its_own_url(sandbox, http_server):
    first = http_server.add("/cdn/one.png", png(1))
    second = http_server.add("/cdn/two.png", png(2))
    table = http_server.add("/cdn/captions.csv", b"image_file,caption\none.png,first picture\ntwo.png,second\n")
    dataset = _prepare(sandbox, [first, second, table])
    assert [s.caption for s in dataset.samples] == ["TOK, first picture", "TOK, second"]


def test_404_names_the_url_without_its_secrets(sandbox, http_server):
    url = http_server.url("/private/photos.zip", "X-Amz-Signature=TOPSECRET&X-Amz-Credential=AKIAXYZ")
    url = url.replace("http://", "http://alice:hunter2@")
    before = sandbox.snapshot()
    with pytest.raises(SourceError) as error:
        _prepare(sandbox, url)
    message = str(error.value)
    assert "HTTP 404" in message and "not found" in message and "/private/photos.zip" in message
    for secret in ("TOPSECRET", "AKIAXYZ", "hunter2", "alice"):
        assert secret not in message
    sandbox.assert_nothing_written_outside(before)


def test_server_errors_are_retried_then_reported(sandbox, http_server):
    url = http_server.add("/flaky.zip", zip_bytes({"a.png": png(1)}), fail_first=1)
    assert len(_prepare(sandbox, url)) == 1
    assert http_server.hits["/flaky.zip"] == 2
    broken = http_server.add("/broken.zip", b"", status=500)
    with pytest.raises(SourceError, match=r"broken.zip: server answered HTTP 500 \(gave up after 3 attempts\)"):
        _prepare(sandbox, broken, limits=fast_limits(http_retries=2))
    assert http_server.hits["/broken.zip"] == 3


def test_timeouts_are_reported(sandbox, http_server):
    url = http_server.add("/slow.zip", zip_bytes({"a.png": png(1)}), delay=2.5)
    with pytest.raises(SourceError, match=r"slow.zip: timed out.*gave up after 1 attempts"):
        _prepare(sandbox, url, limits=fast_limits(http_retries=0, http_timeout=(2.0, 0.5)))


def test_download_size_cap(sandbox, http_server):
    url = http_server.add("/big.zip", zip_bytes({"a.png": png(1, 400, 400)}))
    with pytest.raises(SourceError, match=r"big.zip: .* over the limit of 1.0 KiB"):
        _prepare(sandbox, url, limits=fast_limits(max_download_bytes=1024))


def test_html_instead_of_a_file(sandbox, http_server):
    url = http_server.add("/share/abc", b"<!DOCTYPE html><html><body>Sign in to download</body></html>",
                          headers={"Content-Type": "text/html"})
    with pytest.raises(SourceError, match=r"HTML page.*direct download link"):
        _prepare(sandbox, url)


def test_bad_sources_fail_before_anything_is_downloaded(sandbox, http_server):
    url = http_server.add("/ok.zip", zip_bytes({"a.png": png(1)}))
    with pytest.raises(SourceError, match="unsupported scheme 'ftp://'"):
        _prepare(sandbox, f"{url}|ftp://files.example/x.zip")
    with pytest.raises(SourceError, match="local paths are not accepted"):
        _prepare(sandbox, [url, str(sandbox.inputs)], allow_local=False)
    assert http_server.hits["/ok.zip"] == 0


def test_download_helper_keeps_its_contract(tmp_path, http_server):
    url = http_server.add("/model.bin", b"weights" * 100)
    target = download(url, tmp_path / "cache" / "model.bin", retries=0)
    assert target.read_bytes() == b"weights" * 100
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(http_server.url("/missing"), tmp_path / "missing.bin", retries=0)
    assert not (tmp_path / "missing.bin").exists()
    assert redact_url("https://u:p@h.example:8443/a/b?sig=1") == "https://h.example:8443/a/b?…"
