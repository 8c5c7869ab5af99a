"""The LAION-layout aesthetic head loads from its file format and computes what the original module computes."""

from __future__ import annotations

import http.server
import threading

import pytest
import torch
from safetensors.torch import save_file

from tests.evaluate.conftest import EMBED_DIM, build_aesthetic_weights, laion_head
from trainer.evaluate.aesthetic import AestheticPredictor, load_aesthetic_predictor
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS


def test_scores_match_the_original_module(tiny_aesthetic, tmp_path):
    predictor = load_aesthetic_predictor(str(tiny_aesthetic), tmp_path)
    reference = laion_head((EMBED_DIM, 32, 8, 4, 2))  # same seed, same weights, eval mode (dropout off)
    embeds = torch.nn.functional.normalize(torch.randn(5, EMBED_DIM, generator=torch.Generator().manual_seed(3)),
                                           dim=-1)
    with torch.no_grad():
        expected = reference(embeds).squeeze(-1)
    scores = predictor(embeds)
    assert scores.shape == (5,) and predictor.input_dim == EMBED_DIM
    torch.testing.assert_close(scores, expected)
    assert scores.std() > 0.01, "different embeddings must score differently"


def test_the_real_laion_layout_and_safetensors_load(tmp_path):
    # sac+logos+ava1-l14-linearMSE.pth: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 under layers.0/2/4/6/7.
    state = laion_head((768, 1024, 128, 64, 16)).state_dict()
    assert sorted({k.split(".")[1] for k in state}) == ["0", "2", "4", "6", "7"]
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    predictor = load_aesthetic_predictor(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), tmp_path)
    assert predictor.input_dim == 768 and [layer.out_features for layer in predictor.layers] == [1024, 128, 64, 16, 1]
    save_file(state, str(tmp_path / "head.safetensors"))
    again = load_aesthetic_predictor(str(tmp_path / "head.safetensors"), tmp_path)
    x = torch.nn.functional.normalize(torch.randn(2, 768), dim=-1)
    torch.testing.assert_close(again(x), predictor(x))
    # Lightning-style checkpoints keep the weights under "state_dict".
    wrapped = AestheticPredictor.from_state_dict({"state_dict": state})
    torch.testing.assert_close(wrapped(x), predictor(x))


def test_weights_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "aesthetic.pth"
    with pytest.raises(ValueError, match=r"aesthetic weights '.*nowhere/aesthetic.pth' do not exist: download "
                                         r"sac\+logos\+ava1-l14-linearMSE.pth"):
        load_aesthetic_predictor(str(missing), tmp_path)
    torch.save({"fc.weight": torch.ones(1, 4)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a LAION-style aesthetic predictor.*found keys fc\.weight"):
        load_aesthetic_predictor(str(tmp_path / "other.pth"), tmp_path)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        load_aesthetic_predictor(str(tmp_path / "text.pth"), tmp_path)
    broken = {"layers.0.weight": torch.ones(8, 4), "layers.0.bias": torch.ones(8),
              "layers.2.weight": torch.ones(1, 5), "layers.2.bias": torch.ones(1)}
    with pytest.raises(ValueError, match=r"layers\.2 takes 5 inputs but the layer before it gives 8"):
        AestheticPredictor.from_state_dict(broken)
    with pytest.raises(ValueError, match="the last layer gives 8 outputs"):
        AestheticPredictor.from_state_dict({k: v for k, v in broken.items() if k.startswith("layers.0")})


def test_weights_from_a_url_are_downloaded_once(tmp_path, monkeypatch):
    payload = build_aesthetic_weights(tmp_path / "served.pth").read_bytes()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path != "/weights/aesthetic.pth":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.server_port}")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        first = load_aesthetic_predictor(f"{base}/weights/aesthetic.pth", tmp_path / "cache")
        second = load_aesthetic_predictor(f"{base}/weights/aesthetic.pth", tmp_path / "cache")
        assert hits == ["/weights/aesthetic.pth"], "the second load must come from the cache"
        x = torch.nn.functional.normalize(torch.randn(2, EMBED_DIM), dim=-1)
        torch.testing.assert_close(first(x), second(x))
        with pytest.raises(ValueError, match=r"could not download the aesthetic.*HTTP 404.*pass its local path"):
            load_aesthetic_predictor(f"{base}/missing.pth", tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
