"""Reading lora_training_urls: separators, JSON lists, schemes, local paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.errors import SourceError
from trainer.data.ingest.local import resolve_local
from trainer.data.ingest.sources import parse_source, split_sources

# URL-ish sources: no separators of their own except commas inside the path, as Cloudinary-style URLs have.
_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)
_url = st.builds(
    lambda scheme, host, parts, comma: f"{scheme}://{host}.example/" + "/".join(parts) + (",h_1/x" if comma else ""),
    st.sampled_from(["http", "https", "s3"]), _segment, st.lists(_segment, min_size=1, max_size=4), st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_url, min_size=1, max_size=6), st.sampled_from(["|", "\n", ", ", ",", " | ", "\r\n"]))
def test_split_sources_round_trips_any_separator(urls, separator):
    assert split_sources(separator.join(urls)) == urls


@settings(max_examples=100, deadline=None)
@given(st.lists(_url, min_size=1, max_size=6))
def test_split_sources_reads_json_lists_and_python_lists(urls):
    import json

    assert split_sources(json.dumps(urls)) == urls
    assert split_sources(urls) == urls


def test_commas_inside_a_url_are_kept():
    url = "https://res.example.com/image/upload/w_200,h_100,c_fill/photo.jpg"
    assert split_sources(url) == [url]
    assert split_sources(f"{url},https://b.example/x.zip") == [url, "https://b.example/x.zip"]


def test_local_paths_split_on_commas_and_quotes_are_stripped():
    assert split_sources("a/b, c/d ,'e f'") == ["a/b", "c/d", "e f"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[not json", "does not parse"),
        ('{"a": 1}', None),  # not a list: read as a single local path
        ("[1, 2]", "must hold strings"),
        (" | , \n", "empty"),
    ],
)
def test_split_sources_errors(value, message):
    if message is None:
        assert split_sources(value) == [value]
        return
    with pytest.raises(SourceError, match=message):
        split_sources(value)


@pytest.mark.parametrize(
    ("source", "kind"),
    [("https://h/x.zip", "http"), ("HTTP://h/x.zip", "http"), ("s3://bucket/k", "s3"), ("file:///tmp/x", "local"),
     ("relative/folder", "local"), ("/abs/x.jpg", "local")],
)
def test_parse_source_kinds(source, kind):
    assert parse_source(source).kind == kind


@pytest.mark.parametrize("source", ["ftp://h/x.zip", "gs://bucket/x", "hf://datasets/x", "data:image/png;base64,AAA"])
def test_unsupported_schemes_are_refused_with_the_supported_list(source):
    with pytest.raises(SourceError) as error:
        parse_source(source)
    assert "http" in str(error.value) and "s3://" in str(error.value)


def test_labels_hide_credentials_and_signatures():
    ref = parse_source("https://user:hunter2@h.example/x.zip?X-Amz-Signature=abc123&token=zzz")
    assert "hunter2" not in ref.label and "abc123" not in ref.label and "zzz" not in ref.label
    assert ref.label.startswith("https://h.example/x.zip")


def test_local_paths_need_permission(tmp_path):
    ref = parse_source(str(tmp_path))
    assert resolve_local(ref, allow_local=True) == tmp_path
    with pytest.raises(SourceError, match="local paths are not accepted"):
        resolve_local(ref, allow_local=False)
    with pytest.raises(SourceError, match="local paths are not accepted"):
        resolve_local(parse_source(f"file://{tmp_path}"), allow_local=False)


def test_missing_local_path_suggests_a_scheme():
    with pytest.raises(SourceError, match=r"no such file or folder \(did you mean https://"):
        resolve_local(parse_source("www.example.com/images.zip"), allow_local=True)
