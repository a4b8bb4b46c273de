"""velox-serve: real HTTP requests on localhost against the tiny converted model (random
weights: the assertions are on response shapes and prompt-cache reuse, not on text)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from velox.convert.cli import main as convert_main

ROOT = Path(__file__).resolve().parent.parent
CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """velox-serve in a subprocess on a free port; yields (base url, log file)."""
    tmp = tmp_path_factory.mktemp("serve")
    folder = tmp / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(folder), "--kv",
                         "turboquant_prod,turboquant_mse", "--kv-sink", "2", "--kv-window", "4", *CALIB]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # velox's --kv plus mlx_lm.server flags (--max-tokens, --prompt-cache-size) pass through
    cmd = [sys.executable, "-m", "velox.runtime.serve", "--model", str(folder), "--kv", "turboquant_mse",
           "--port", str(port), "--max-tokens", "6", "--prompt-cache-size", "4", "--log-level", "INFO"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, log.read_text()
                time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, body: dict):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


def chat(url: str, messages: list[dict], **kw) -> dict:
    with post(url, {"messages": messages, "temperature": 0, **kw}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        return json.loads(r.read())


def test_chat_completion_uses_velox_caches(server):
    url, log = server
    out = chat(url, [{"role": "user", "content": "Name three colours."}])
    assert out["object"] == "chat.completion" and len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 0 < out["usage"]["completion_tokens"] <= 6  # the server's --max-tokens
    assert "velox-serve: " in log.read_text() and "turboquant_mse KV caches on 2 of 2 layers" in log.read_text()


def test_streaming(server):
    url, _ = server
    with post(url, {"messages": [{"role": "user", "content": "Count to five."}], "stream": True,
                    "max_tokens": 4, "temperature": 0}) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [line[len(b"data: "):] for line in r.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_second_turn_reuses_the_prompt_cache(server):
    """Turn 2 reuses turn 1's cache (trimmed back to the first prompt: the assistant turn
    differs from what was generated, then extended); asking turn 2 again trims the stored one."""
    url, _ = server
    turn1 = [{"role": "user", "content": "Tell me about the sea and its many fishes."}]
    first = chat(url, turn1, max_tokens=5)
    # A fixed reply (random weights never say it) that does not merge with the template's "\n"
    turn2 = turn1 + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And the rivers?"}]
    second = chat(url, turn2, max_tokens=5)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"]
    again = chat(url, turn2, max_tokens=5)
    # stored: turn-2 prompt + its completion; mlx_lm trims it to all but the prompt's last token
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"] - 1
    assert again["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
