"""Vision end to end: a tiny random Qwen2-VL model + mmproj loaded by `engine.load`, generating through
the LLM facade (checked against the image rows fed by hand), and served by a real uvicorn server
the anthropic SDK sends images to (base64, and a loopback URL with the private-URL flag)."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import numpy as np
import pytest
from PIL import Image

from kawai import engine
from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from api_harness import LiveServer
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import KVCache
from one_sequence import forward
from kawai.engine.sampling import SamplingParams
from kawai.engine.vision.image_prompt import image_prompt
from kawai.engine.vision.multimodal import encode_image, find_projector
from pictures import photo
from vision_models import write_tiny_vl

PHOTO = photo(100, 73, seed=1)  # 12 image tokens
PHOTO2 = photo(260, 150, seed=2)  # 45 image tokens


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_vl(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def llm(files):
    return engine.load(files[0], threads=1, exact=True)


def ask(*parts):
    return [{"role": "user", "content": [{"type": "image", "image": p} if isinstance(p, Image.Image)
                                         else {"type": "text", "text": p} for p in parts]}]


def test_load_finds_the_projector_next_to_the_model(llm, files):
    assert find_projector(files[0]) == files[1]
    assert llm.has_vision and llm.projector.path == files[1]
    with pytest.raises(KawaiError, match="not found"):
        engine.load(files[0], threads=1, mmproj=files[0].parent / "nope.gguf")


def test_text_models_do_not_take_a_projector(smollm_model_path, files):
    with pytest.raises(KawaiError, match="does not take images"):
        engine.load(smollm_model_path, threads=1, mmproj=files[1])


def test_encode_chat_expands_each_image(llm):
    t = llm.vision_tokens
    ids = llm.encode_chat(ask(PHOTO, "what is this?", PHOTO2))
    assert ids.ids.count(t.image_pad) == 12 + 45 and ids.ids.count(t.start) == 2 and ids.images == (PHOTO, PHOTO2)
    assert ids.image_tokens == 57 and llm.count_chat_tokens(ask(PHOTO, "what is this?", PHOTO2)) == len(ids)
    assert ids.text == llm.render_chat(ask(PHOTO, "what is this?", PHOTO2))
    # a typed placeholder is text, not an image slot
    typed = llm.encode_chat([{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>"}])
    assert t.image_pad not in typed.ids and not typed.images


def test_generate_with_images_matches_prefill_and_mrope_decoding(llm):
    ids = llm.encode_chat(ask(PHOTO, "describe", PHOTO2))
    gen = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6))
    steps = list(gen)
    assert gen.stats.image_tokens == 57 and gen.stats.vision_seconds > 0
    assert gen.stats.prefill_seconds >= gen.stats.vision_seconds

    # the same by hand: the image rows as embeddings at M-RoPE positions, then decode at cache.length + rope_delta
    cache = KVCache(llm.config, 256, llm.kv_dtype)
    embedded = [encode_image(llm.projector, im) for im in (PHOTO, PHOTO2)]
    image = image_prompt(llm.config, ids.ids, embedded, llm.vision_tokens.image_pad, 2)
    logits = forward(llm.config, llm.weights, np.array(ids.ids), cache, positions=image.positions,
                     embeddings=image.embeddings, embedding_rows=np.flatnonzero(image.is_image))[-1]
    expected = []
    for _ in steps:
        token = int(np.argmax(logits))
        expected.append(token)
        logits = forward(llm.config, llm.weights, [token], cache,
                         positions=np.array([cache.length + image.rope_delta]))[-1]
    assert [s.token_id for s in steps] == expected[: len(steps)]


def test_cache_is_not_reused_across_images(llm):
    """Image pads of different pictures have the same id: a warm cache must not pass for the new image."""
    cache = llm.new_cache()
    params = SamplingParams(temperature=0, max_tokens=3)
    list(llm.generate(llm.encode_chat(ask(PHOTO2, "describe")), params, cache=cache))
    ids = llm.encode_chat(ask(PHOTO2.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "describe"))
    warm = llm.generate(ids, params, cache=cache)
    cold = llm.generate(ids, params)
    assert [s.token_id for s in warm] == [s.token_id for s in cold]
    assert warm.stats.cached_tokens <= ids.ids.index(llm.vision_tokens.image_pad)


# ---- the HTTP API ---------------------------------------------------------------------------------


class ImageHandler(BaseHTTPRequestHandler):
    body = png(PHOTO)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture(scope="module")
def image_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/photo.png"
    httpd.shutdown()
    httpd.server_close()


def serve(llm, allow_private: bool):
    settings = ServerSettings(auth=False, allow_private_image_urls=allow_private, ping_interval=1.0)
    return LiveServer(create_app(settings, [llm]))


B64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(PHOTO)).decode()}}


def test_sdk_sends_images_and_usage_counts_image_tokens(llm, image_url):
    url_block = {"type": "image", "source": {"type": "url", "url": image_url}}
    tool_turns = [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "camera", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [B64, {"type": "text", "text": "snapshot"}]}]},
    ]
    with serve(llm, allow_private=True) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        for n_images, messages in (
            (1, [{"role": "user", "content": [B64, {"type": "text", "text": "What is in the picture?"}]}]),
            (2, [{"role": "user", "content": [url_block, B64, {"type": "text", "text": "Compare."}]}]),
            (1, tool_turns),
        ):
            kw = dict(model=llm.id, messages=messages)
            counted = client.messages.count_tokens(**kw).input_tokens
            reply = client.messages.create(max_tokens=4, **kw)
            assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) == counted
            assert reply.usage.output_tokens >= 1 and reply.stop_reason in ("max_tokens", "end_turn")
            text_only = client.messages.count_tokens(
                model=llm.id, messages=[{"role": "user", "content": "x"}]).input_tokens
            assert counted >= text_only + 14 * n_images  # each image: 12 image tokens + start + end

        with client.messages.stream(model=llm.id, max_tokens=3, messages=[{"role": "user", "content": [B64]}]) as s:
            final = s.get_final_message()
        assert final.usage.output_tokens >= 1


def test_api_image_errors_are_400(llm, image_url):
    with serve(llm, allow_private=False) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)

        def refused(block, match):
            with pytest.raises(anthropic.BadRequestError, match=match):
                client.messages.create(model=llm.id, max_tokens=2, messages=[{"role": "user", "content": [block]}])

        refused({"type": "image", "source": {"type": "url", "url": image_url}}, "private or loopback")
        refused({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}}, "base64")
        bad = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
        refused({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": bad}}, "corrupt")
        with pytest.raises(anthropic.BadRequestError, match="too many images"):
            client.messages.count_tokens(model=llm.id, messages=[{"role": "user", "content": [B64] * 101}])


def test_pull_puts_the_projector_where_load_finds_it(files, tmp_path, monkeypatch, smollm_model_path):
    from kawai.engine import catalog

    monkeypatch.setenv("KAWAI_HOME", str(tmp_path))
    model = catalog.pull(str(files[0]), progress=False)
    model_id = model.name.removesuffix(".gguf")
    with pytest.raises(KawaiError, match="not a vision projector"):
        catalog.pull_projector(str(smollm_model_path), model_id, progress=False)
    projector = catalog.pull_projector(str(files[1]), model_id, progress=False)
    assert projector == catalog.projector_path(model_id) and projector.name == f"{model_id}.mmproj.gguf"
    assert find_projector(catalog.resolve_model(model_id)) == projector
    assert [m.id for m in catalog.list_local_models()] == [model_id]  # a projector is not a model
    llm = engine.load(model_id, threads=1)
    assert llm.has_vision and llm.id == model_id


def test_cli_flags(files, tmp_path, monkeypatch, capsys):
    from kawai.api.cli import main

    monkeypatch.setenv("KAWAI_HOME", str(tmp_path))
    assert main(["serve", "-m", str(files[0]), "-m", str(files[0]), "--mmproj", str(files[1]), "--no-auth"]) != 0
    assert "--mmproj needs exactly one -m model" in capsys.readouterr().err
    assert main(["pull", str(files[0]), "--mmproj", str(files[0]), "-q"]) != 0
    assert "not a vision projector" in capsys.readouterr().err
    assert main(["pull", str(files[0]), "--mmproj", str(files[1]), "-q"]) == 0
    assert "vision projector tiny-vl-f32.mmproj.gguf ready" in capsys.readouterr().out
