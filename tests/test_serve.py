"""`mtnlg serve` driven as a user drives it: a live server on a random localhost port, the official `openai`
SDK (and plain HTTP for what the SDK does not send), results checked against in-process ones."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

import mtnlg
from served import Served, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    from mtnlg.checkpoint import save_checkpoint
    from mtnlg.config import Config, ModelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny", max_seq_len=256)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-serve", model, Config(model=model.cfg),
                           Tokenizer.load(tiny_data.parent))


@pytest.fixture(scope="module")
def server(checkpoint):
    served = Served(checkpoint, "--max-num-seqs", "8", "--token-budget", "48")
    yield served
    log = served.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def local(checkpoint):
    return mtnlg.load(checkpoint, "cpu", dtype="fp32")


def test_models_and_completions_through_the_sdk(server, local):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-serve"]
    out = client.completions.create(model="tiny-serve", prompt="The model learns", max_tokens=12, temperature=0)
    ours = local.generate("The model learns", max_new_tokens=12, temperature=0)[0]
    assert out.choices[0].text == ours.text and out.choices[0].finish_reason == ours.finish_reason
    assert out.usage.prompt_tokens == len(local.tokenizer.encode("The model learns"))
    assert out.usage.completion_tokens == len(ours.token_ids)


def test_streaming_joins_to_the_same_text_for_the_same_seed(server):
    client = server.client()
    args = dict(model="tiny-serve", max_tokens=40, temperature=1.0, top_p=0.9, seed=11, stop=[" data"])
    whole = client.completions.create(prompt="Training runs", **args).choices[0].text
    chunks = list(client.completions.create(prompt="Training runs", stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-2].choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(prompt="Training runs", stream=True, logprobs=1, **args)
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    tokens = [t for p in pieces for t in p.tokens]
    assert [o for p in pieces for o in p.text_offset] == np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is attention?"}]
    chat = client.chat.completions.create(model="tiny-serve", messages=messages, max_completion_tokens=30, seed=5)
    streamed = client.chat.completions.create(model="tiny-serve", messages=messages, max_completion_tokens=30, seed=5,
                                              stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"


def test_chat_renders_the_template(server, local):
    """No template in the checkpoint: the built-in one, the same text /tokenize shows."""
    messages = [{"role": "user", "content": "Hello"}]
    ids = server.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert local.tokenizer.decode(ids) == "User: Hello\nAssistant:"
    out = server.client().chat.completions.create(model="tiny-serve", messages=messages, max_tokens=10, temperature=0)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == local.generate("User: Hello\nAssistant:", max_new_tokens=10, temperature=0,
                                                            stop=["\nUser:"])[0].text


def test_n_samples_are_distinct_and_reproducible(server):
    client = server.client()
    first = client.completions.create(model="tiny-serve", prompt=["A model", "The loss"], n=3, max_tokens=16, seed=2)
    again = client.completions.create(model="tiny-serve", prompt=["A model", "The loss"], n=3, max_tokens=16, seed=2)
    assert [c.index for c in first.choices] == list(range(6))
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts[:3])) > 1


def test_echo_logprobs_equal_in_process_scores(server, local):
    """What lm-eval's local-completions asks to score a multiple-choice answer."""
    text = "The model learns to predict the next token."
    ids = [local.tokenizer.eod_id, *local.tokenizer.encode(text)]  # score() conditions on EOD: so does this prompt
    out = server.client().completions.create(model="tiny-serve", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = local.score(text)[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-5, rtol=0)
    assert lp.tokens == [local.tokenizer.decode([t]) for t in ids]
    assert out.choices[0].text == local.tokenizer.decode(ids)
    assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()
    assert all(max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    generated = server.client().completions.create(model="tiny-serve", prompt=ids, max_tokens=3, echo=True, logprobs=2,
                                                   temperature=0).choices[0].logprobs
    assert len(generated.tokens) == len(ids) + 3 and len(generated.top_logprobs[-1]) >= 1


def test_embeddings_in_float_and_base64(server, local):
    client = server.client()
    inputs = ["attention over layers", "the loss falls slowly as steps pass"]
    as_base64 = client.embeddings.create(model="tiny-serve", input=inputs)  # the SDK asks for base64 and decodes it
    as_float = client.embeddings.create(model="tiny-serve", input=inputs, encoding_format="float")
    raw = server.post("/v1/embeddings", json={"input": inputs[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    for text, a, b in zip(inputs, as_base64.data, as_float.data):
        ids = torch.tensor([local.tokenizer.encode(text)])
        with torch.no_grad():
            expected = torch.nn.functional.normalize(local.model(ids, hidden=True)[0].mean(0), dim=0)
        np.testing.assert_allclose(a.embedding, expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(b.embedding, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(decoded, as_float.data[0].embedding, atol=1e-7)
    assert as_float.usage.prompt_tokens == sum(len(local.tokenizer.encode(t)) for t in inputs)


def test_tokenize_and_detokenize(server, local):
    body = server.post("/tokenize", json={"prompt": "Attention over heads"}).json()
    assert body["tokens"] == local.tokenizer.encode("Attention over heads") and body["max_model_len"] == 256
    assert server.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"] == "Attention over heads"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token_id"] == local.tokenizer.eod_id and info["model_max_length"] == 256
    assert info["bos_token_id"] == local.tokenizer.bos_id  # what lm-eval's remote tokenizer scores documents after


def test_errors_answer_in_the_openai_envelope(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-serve", prompt="x", temperature=-1)
    assert bad.value.body["param"] == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny-serve", prompt="x " * 200, max_tokens=100)
    message = long.value.body["message"]
    assert "max_tokens is 100" in message and "context of 256" in message
    for bad in ({"temperature": 1e-40}, {"seed": 2**64}, {"repetition_penalty": 1e-300}):  # would overflow inside
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-serve", prompt="x", extra_body=bad)
    with pytest.raises(openai.BadRequestError, match="sequences"):
        client.completions.create(model="tiny-serve", prompt=["a", "b"], n=64)  # more than slots + queue
    with pytest.raises(openai.BadRequestError, match="beam search"):
        client.completions.create(model="tiny-serve", prompt="x", extra_body={"use_beam_search": True})
    too_big = server.post("/v1/completions", content=b"{" + b" " * (5 * 2**20) + b"}",
                          headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    for body in (b"not json", b"[1, 2]", b'{"prompt": {"a": 1}}', b'{"prompt": [-5]}', b'{"prompt": ""}'):
        response = server.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert server.post("/v1/nothing", json={}).status_code == 404
    assert client.completions.create(model="tiny-serve", prompt="still", max_tokens=2).choices  # the loop lives on


def test_concurrent_requests_each_equal_to_alone(server):
    """32 mixed-length greedy requests at once on 8 slots equal the same requests sent one by one."""
    rng = np.random.default_rng(0)
    words = "the a model learns to predict next token from text data with attention over layers".split()
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(32)]
    client = server.client(timeout=120)

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny-serve", prompt=prompt, max_tokens=int(8 + len(prompt) % 24),
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert server.metric("mtnlg_slots_used") == 0
    # a prompt served before is not read again (a free slot still holds it), and answers the same
    before = server.metric("mtnlg_prompt_tokens_reused_total")
    assert ask(prompts[-1]) == alone[-1]
    assert server.metric("mtnlg_prompt_tokens_reused_total") > before


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"prompt": "The", "max_tokens": 200, "stream": True, "extra": 1, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while server.metric("mtnlg_slots_used") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("mtnlg_slots_used") == 0
    assert server.metric('mtnlg_requests_finished_total{finish_reason="cancelled"}') >= 1


def test_full_queue_answers_503_and_the_api_key_is_checked(checkpoint):
    served = Served(checkpoint, "--max-num-seqs", "1", "--max-queue", "0", "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            served.client(api_key="wrong").models.list()
        assert httpx.post(served.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(served.url + "/health").status_code == 200 and httpx.get(served.url + "/metrics").status_code == 200
        client = served.client(api_key="sesame")
        stream = client.completions.create(model="tiny-serve", prompt="The", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the only slot is busy, and nothing may wait
        with pytest.raises(openai.InternalServerError) as busy:
            client.completions.create(model="tiny-serve", prompt="x", max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.response.headers["Retry-After"] == "1"
        stream.close()
        assert served.metric("mtnlg_requests_rejected_total") == 1
    finally:
        log = served.stop()
    assert "Traceback" not in log, log


def test_serve_refuses_a_missing_checkpoint_and_a_model_it_cannot_load(tmp_path, checkpoint):
    result = subprocess.run([sys.executable, "-m", "mtnlg", "serve", str(tmp_path / "nothing")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "mtnlg serve: error:" in result.stderr
    # bf16 on a CPU without bf16 instructions fails while loading, once the server is already up
    result = subprocess.run([sys.executable, "-m", "mtnlg", "serve", str(checkpoint), "--dtype", "bf16", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mtnlg serve: error: bf16 weights need")


def test_loading_then_a_failing_step_ends_its_stream_with_an_error_event_and_the_loop_lives_on(checkpoint):
    """In process: /health is 503 until the model is loaded; then a forward raises midway through a stream."""
    from fastapi.testclient import TestClient

    from mtnlg.serve.app import Settings, create_app

    lm = mtnlg.load(checkpoint, "cpu", dtype="fp32")
    forward, calls = lm.model.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("a broken step")
        return forward(*args, **kwargs)

    lm.model.forward = flaky
    loaded = threading.Event()

    def load():
        loaded.wait(timeout=30)
        return lm

    with TestClient(create_app(Settings(name="m"), load)) as client:
        assert client.get("/health").status_code == 503  # still loading: the API says so too
        busy = client.post("/v1/completions", json={"prompt": "The"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        loaded.set()
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        body = {"prompt": "The", "max_tokens": 20, "stream": True, "ignore_eos": True, "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "server_error"
        assert json.loads(events[0])["choices"][0]["text"]  # text came before the failure
        after = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3, "ignore_eos": True})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_the_playground_streams_text_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-serve'")
            page.fill("#prompt", "The model learns")
            page.fill("#max_tokens", "40")
            page.fill("#seed", "3")
            page.click("#send")
            page.wait_for_selector("#output[data-done]", timeout=30_000)
            chunks = int(page.get_attribute("#output", "data-chunks"))
            text = page.inner_text("#output")
            assert chunks > 1 and text.startswith("The model learns") and len(text) > len("The model learns")
            assert "tokens/s" in page.inner_text("#stats")
            page.check("input[value=chat]")
            page.fill("#prompt", "Hello")
            page.click("#send")
            page.wait_for_selector("#output[data-done]", timeout=30_000)
            assert page.inner_text("#output").startswith("user: Hello\nassistant:")
            page.screenshot(path=str(tmp_path / "playground.png"))  # in the test's temp dir, never in git
        finally:
            browser.close()
