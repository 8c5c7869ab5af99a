"""Captioning through the real code paths: tiny BLIP and Florence-2 loaded from folders, GPT-4V against a fake
OpenAI server on 127.0.0.1."""

from __future__ import annotations

import base64
import gc
import io
import json
import threading
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tests.data.factories import config, fast_limits, png
from tests.data.tiny_models import CAPTION_WORD
from trainer.data.captioners.gpt4v import OpenAIError
from trainer.data.errors import DataError
from trainer.data.prepare import prepare_dataset


def _images(folder, n=3, captioned=()):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(png(i, 96, 80))
    for i in captioned:
        (folder / f"img{i}.txt").write_text("my own caption of the left side")
    return folder


@pytest.mark.parametrize("model", ["blip", "florence"])
def test_local_captioners_caption_only_what_lacks_a_caption(sandbox, tiny_models, model, monkeypatch):
    folder = tiny_models(model)
    images = _images(sandbox.inputs, n=3, captioned=(1,))
    import transformers

    loaded = []
    model_class = {"blip": transformers.BlipForConditionalGeneration,
                   "florence": transformers.Florence2ForConditionalGeneration}[model]
    original = model_class.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        instance = original(cls, *args, **kwargs)
        loaded.append(weakref.ref(instance))
        return instance

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(spy))
    # Short captions keep the test fast; the code path is the same.
    monkeypatch.setattr(f"trainer.data.captioners.{model}.MAX_NEW_TOKENS", 6)
    before = sandbox.snapshot()
    dataset = prepare_dataset(config(images, caption_model=model, caption_model_path=str(folder),
                                     caption_prefix="photo of", prompt_modifier="{}, highly detailed"),
                              sandbox.work_dir, limits=fast_limits())
    sandbox.assert_nothing_written_outside(before)
    captions = [s.caption for s in dataset.samples]
    generated = f"{CAPTION_WORD} {CAPTION_WORD}"
    # Eden's placement: "<prefix>, <caption>", the modifier template, then TOK in front as the prefix lacks it.
    assert captions[1] == "TOK, photo of, my own caption of the left side, highly detailed"
    for caption in (captions[0], captions[2]):
        assert caption.startswith(f"TOK, photo of, {generated}") and caption.endswith(", highly detailed")
    assert dataset.info["caption_sources"] == {"sidecar": 1, "model": 2}
    assert dataset.info["caption_model"] == model
    assert len(loaded) == 1  # loaded once for all images...
    gc.collect()
    assert loaded[0]() is None  # ...and freed afterwards


def test_missing_model_folder_is_a_clear_error(sandbox):
    images = _images(sandbox.inputs, n=1)
    with pytest.raises(DataError, match=r"caption_model_path: the Florence-2 model .* neither an existing folder"):
        prepare_dataset(config(images, caption_model="florence", caption_model_path="./no/such/folder"),
                        sandbox.work_dir, limits=fast_limits())


def test_all_captioned_needs_no_model(sandbox):
    images = _images(sandbox.inputs, n=2, captioned=(0, 1))
    dataset = prepare_dataset(config(images, caption_model="florence", caption_model_path="./no/such/folder"),
                              sandbox.work_dir, limits=fast_limits())
    assert dataset.info["caption_sources"] == {"sidecar": 2}


def test_style_mode_and_no_caption(sandbox):
    images = _images(sandbox.inputs, n=2, captioned=(0,))
    dataset = prepare_dataset(config(images, concept_mode="style"), sandbox.work_dir, limits=fast_limits())
    # Eden's: "in the style of TOK, " + caption, through its fix_prompt (which keeps the comma of an empty one).
    assert [s.caption for s in dataset.samples] == ["in the style of TOK, my own caption of the left side",
                                                    "in the style of TOK,"]


# ------------------------------------------------------------------------------------------------------- GPT-4V
class FakeOpenAI:
    """Speaks /v1/chat/completions like the real API: checks the key, answers captions, rewrites for the trigger."""

    def __init__(self, key: str = "sk-test-key-123", fail_first: int = 0) -> None:
        self.key = key
        self.fail_first = fail_first
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._answer(401, {"error": {"message": "Incorrect API key provided"}})
                if fake.fail_first > 0:
                    fake.fail_first -= 1
                    return self._answer(503, {"error": {"message": "overloaded"}})
                content = body["messages"][-1]["content"]
                if isinstance(content, list):  # a captioning request with an image
                    image_part = next(p for p in content if p["type"] == "image_url")
                    data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
                    width, height = Image.open(io.BytesIO(data)).size
                    text = f"a man in a blue coat standing on the left, {width}x{height}."
                else:  # the trigger rewrite: a JSON list in the prompt
                    captions = json.loads(content[content.index("["):])
                    text = json.dumps([c.replace("a man", "TOK") for c in captions])
                return self._answer(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def openai(monkeypatch):
    fake = FakeOpenAI(fail_first=1)
    monkeypatch.setenv("OPENAI_API_KEY", fake.key)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    yield fake
    fake.close()


def test_gpt4v_captions_and_trigger_rewrite(sandbox, openai):
    images = _images(sandbox.inputs, n=2)
    dataset = prepare_dataset(config(images, concept_mode="face", caption_model="gpt4-v", caption_model_path="gpt-x",
                                     use_face_detection_instead=True),
                              sandbox.work_dir, limits=fast_limits())
    captions = [s.caption for s in dataset.samples]
    # The rewrite put the trigger in place of the subject, so no "TOK, " lead is added.
    assert captions == ["TOK in a blue coat standing on the left, 96x80"] * 2
    vision = [r for r in openai.requests if isinstance(r["body"]["messages"][-1]["content"], list)]
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "gpt-x" for r in openai.requests)
    assert len(vision) == 3  # two images, one retried after the 503


def test_gpt4v_without_rewrite(sandbox, openai):
    images = _images(sandbox.inputs, n=1)
    dataset = prepare_dataset(config(images, caption_model="gpt4-v", skip_gpt_cleanup=True), sandbox.work_dir,
                              limits=fast_limits())
    assert dataset.samples[0].caption == "TOK, a man in a blue coat standing on the left, 96x80"
    assert openai.requests[-1]["body"]["model"] == "gpt-4o"


def test_gpt4v_needs_a_key(sandbox, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    images = _images(sandbox.inputs, n=1)
    with pytest.raises(OpenAIError, match="needs an OpenAI API key: set OPENAI_API_KEY"):
        prepare_dataset(config(images, caption_model="gpt4-v"), sandbox.work_dir, limits=fast_limits())


def test_gpt4v_wrong_key_is_reported_without_the_key(sandbox, openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-999")
    images = _images(sandbox.inputs, n=1)
    with pytest.raises(OpenAIError) as error:
        prepare_dataset(config(images, caption_model="gpt4-v"), sandbox.work_dir, limits=fast_limits())
    assert "rejected the key (HTTP 401)" in str(error.value) and "sk-wrong-secret-999" not in str(error.value)
