"""Caption text rules (properties) and captions read from sidecars, captions.csv and metadata.jsonl."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.factories import fast_limits
from trainer.data.caption_files import CaptionIndex
from trainer.data.captions import (
    clean_generated_caption,
    contains_trigger,
    place_trigger,
    replace_trigger,
    swap_left_right,
)
from trainer.data.ingest.collect import Candidate, CaptionTable
from trainer.data.report import PrepReport

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)
captions = st.lists(words, min_size=0, max_size=12).map(" ".join)
modes = st.sampled_from(["face", "object", "style"])


@settings(max_examples=200, deadline=None)
@given(captions, modes, st.sampled_from(["", "a photo of", "TOK portrait,"]), st.one_of(st.none(), words))
def test_trigger_is_placed_once_per_concept_mode(caption, mode, prefix, word):
    """Eden's placement (post_process_captions in trainer/preprocess.py): without a prefix the trigger leads
    ("in the style of TOK, " for styles); a prefix replaces it, and "TOK, " goes in front of a prefix without it;
    prompt_modifier is a str.format template applied after."""
    modifier = f"{{}}, {word}" if word else None
    result = place_trigger(caption, "TOK", mode, prefix, modifier)
    assert len(re.findall(r"(?<![\w<>])TOK(?![\w<>])", result)) == 1
    if not prefix:
        assert result.startswith("in the style of TOK" if mode == "style" else "TOK")
    elif "TOK" in prefix:
        assert result.startswith(prefix)
    else:
        assert result.startswith(f"TOK, {prefix},")
    if word:
        assert result.endswith(f", {word}")
    assert "  " not in result


@settings(max_examples=200, deadline=None)
@given(captions)
def test_words_containing_the_trigger_are_never_touched(caption):
    text = f"tokyo TOKYO {caption} stoked TOKEN"
    assert not contains_trigger(text, "TOK")
    assert replace_trigger(text, "TOK", "<s0><s1>") == text
    placed = place_trigger(text, "TOK", "object")
    assert "tokyo TOKYO" in placed and placed.startswith("TOK, ")


def test_existing_trigger_stays_where_the_user_put_it():
    """The earlier placement, kept behind caption_trigger: where_given (Eden puts the trigger in front anyway)."""
    assert place_trigger("a portrait of TOK smiling", "TOK", "face", rule="where_given") == "a portrait of TOK smiling"
    assert place_trigger("a portrait of TOK smiling", "TOK", "face") == "TOK, a portrait of TOK smiling"
    assert replace_trigger("TOK, TOK's hat", "TOK", "<s0>") == "<s0>, <s0>'s hat"


noisy = st.lists(st.sampled_from(["arafed", "araffe", "The image shows", "  ", "a", "man", "dog", ".", "</s>",
                                  "In this image,", "left", "\"", "blue", "<pad>"]), max_size=15).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(noisy)
def test_generated_caption_cleaning_is_idempotent_and_removes_artefacts(text):
    cleaned = clean_generated_caption(text)
    assert clean_generated_caption(cleaned) == cleaned
    assert "arafed" not in cleaned.lower() and "araffe" not in cleaned.lower()
    assert "</s>" not in cleaned and "<pad>" not in cleaned
    assert cleaned == cleaned.strip() and "  " not in cleaned and not cleaned.endswith(".")


def test_generated_caption_examples():
    assert clean_generated_caption("arafed man in a suit.") == "man in a suit"
    assert clean_generated_caption("The image shows A red car parked on a street.") == "a red car parked on a street"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["left", "Left", "LEFT", "right", "Right", "hand", "on", "the", "leftover"]),
                max_size=10).map(" ".join))
def test_left_right_swap_is_an_involution(text):
    assert swap_left_right(swap_left_right(text)) == text
    assert "leftover" not in text or "leftover" in swap_left_right(text)


# ------------------------------------------------------------------------------------------------ caption files
def _candidate(path, root):
    return Candidate(path=path, label=path.name, root=root)


def test_sidecars_tables_and_their_precedence(tmp_path):
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    names = ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg", "e.jpg"]
    for name in names:
        (root / name).write_bytes(b"x")
    (root / "a.txt").write_text("\ufeff  sidecar   caption\n")  # BOM and whitespace
    (root / "sub" / "d.caption").write_text("kohya caption")
    (root / "captions.csv").write_text(
        "image_file,caption\na.jpg,from csv (loses to the sidecar)\nb.jpg,\"csv, with comma\"\nsub/c.jpg,nested csv\n"
    )
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "d.jpg", "text": "jsonl text"}) + "\nnot json\n"
        + json.dumps({"file_name": "c.jpg", "caption": "jsonl beats the csv above"}) + "\n"
    )
    report = PrepReport()
    tables = [CaptionTable(root / "captions.csv", "captions.csv"), CaptionTable(root / "sub" / "metadata.jsonl", "m")]
    index = CaptionIndex(tables, fast_limits(), report)
    found = {name: index.lookup(_candidate(root / name, root), report) for name in names}
    assert (found["a.jpg"].text, found["a.jpg"].origin) == ("sidecar caption", "sidecar")
    assert (found["b.jpg"].text, found["b.jpg"].origin) == ("csv, with comma", "captions.csv")
    assert (found["sub/c.jpg"].text, found["sub/c.jpg"].origin) == ("jsonl beats the csv above", "metadata.jsonl")
    assert found["sub/d.jpg"].text == "kohya caption"
    assert found["e.jpg"] is None
    assert any("ignored 1 line" in w for w in report.warnings)


def test_csv_matches_bare_names_deeper_down_and_reports_bad_columns(tmp_path):
    root = tmp_path / "set"
    (root / "photos").mkdir(parents=True)
    image = root / "photos" / "p1.png"
    image.write_bytes(b"x")
    (root / "caption.csv").write_text("Caption,File_Name\nfrom the cog-sdxl table,p1.png\n")
    (root / "photos" / "captions.csv").write_text("name,words\np1.png,unused\n")
    report = PrepReport()
    index = CaptionIndex([CaptionTable(root / "caption.csv", "caption.csv"),
                          CaptionTable(root / "photos" / "captions.csv", "photos/captions.csv")], fast_limits(), report)
    assert index.lookup(_candidate(image, root), report).text == "from the cog-sdxl table"
    assert any("photos/captions.csv" in w and "image_file" in w for w in report.warnings)


def test_tables_outside_the_source_do_not_apply(tmp_path):
    (tmp_path / "captions.csv").write_text("image_file,caption\nimg.png,outer\n")
    root = tmp_path / "source"
    root.mkdir()
    (root / "img.png").write_bytes(b"x")
    report = PrepReport()
    index = CaptionIndex([CaptionTable(tmp_path / "captions.csv", "outer")], fast_limits(), report)
    assert index.lookup(_candidate(root / "img.png", root), report) is None


# Captions as people write them: commas, quotes, unicode, stray spaces (never only whitespace).
caption_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029\x85"),
    min_size=1, max_size=60,
).filter(lambda t: t.strip())
file_names = st.text(alphabet="abcdefghij0123456789_-", min_size=1, max_size=8).map(lambda s: f"{s}.png")


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(file_names, caption_text, min_size=1, max_size=8), st.sampled_from(["csv", "jsonl"]))
def test_caption_tables_round_trip(tmp_path_factory, rows, kind):
    import csv
    import io

    from trainer.data.captions import clean_caption_text

    root = tmp_path_factory.mktemp("table")
    for name in rows:
        (root / name).write_bytes(b"x")
    if kind == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["caption", "image_file"])
        writer.writerows([caption, name] for name, caption in rows.items())
        table = root / "captions.csv"
        table.write_text(buffer.getvalue(), encoding="utf-8")
    else:
        table = root / "metadata.jsonl"
        table.write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in rows.items()),
                         encoding="utf-8")
    report = PrepReport()
    index = CaptionIndex([CaptionTable(table, table.name)], fast_limits(), report)
    for name, caption in rows.items():
        found = index.lookup(_candidate(root / name, root), report)
        expected = clean_caption_text(caption)
        assert (found.text if found else "") == expected
    assert not report.warnings


def test_binary_and_escape_sequence_captions_are_refused_or_cleaned_by_name(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for name in ("bin.png", "ansi.png", "nul.png"):
        (root / name).write_bytes(b"x")
    (root / "bin.txt").write_bytes(bytes(range(128, 256)) * 4)  # not text at all
    (root / "nul.txt").write_bytes(b"a cat\x00\x00\x00sitting")
    (root / "ansi.txt").write_bytes(b"a \x1b[31mred\x1b[0m bicycle\x07\x1b]0;pwned\x07")
    report = PrepReport()
    index = CaptionIndex([], fast_limits(), report)
    assert index.lookup(_candidate(root / "bin.png", root), report) is None
    assert index.lookup(_candidate(root / "nul.png", root), report) is None
    assert index.lookup(_candidate(root / "ansi.png", root), report).text == "a red bicycle"
    warnings = " | ".join(report.warnings)
    assert "caption file bin.txt of" in warnings and "not UTF-8 text (binary data?)" in warnings
    assert "caption file nul.txt of" in warnings and "binary data, not text" in warnings
    assert "removed control characters or terminal escapes from the caption file ansi.txt" in warnings


def test_a_bad_metadata_line_is_skipped_with_a_warning_like_the_others(tmp_path):
    """A line nested 100,000 deep (RecursionError in the JSON parser) costs that line, not the job."""
    root = tmp_path / "set"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(b"x")
    table = root / "metadata.jsonl"
    table.write_text(json.dumps({"file_name": "a.png", "text": "first"}) + "\n"
                     + '{"file_name": "x.png", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                     + "[1, 2]\n"
                     + json.dumps({"file_name": "b.png", "text": "second \x1b[1mbold\x1b[0m"}) + "\n")
    report = PrepReport()
    index = CaptionIndex([CaptionTable(table, "photos.zip/metadata.jsonl")], fast_limits(), report)
    assert index.lookup(_candidate(root / "a.png", root), report).text == "first"
    assert index.lookup(_candidate(root / "b.png", root), report).text == "second bold"
    warnings = " | ".join(report.warnings)
    assert "photos.zip/metadata.jsonl: ignored 2 line(s) that are not JSON objects" in warnings
    assert "(line 2, 3)" in warnings
    assert "photos.zip/metadata.jsonl: removed control characters or terminal escapes from 1 caption(s)" in warnings
