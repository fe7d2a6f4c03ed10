"""`qwen2vl-fast serve`: bad usage is one line and exit 2, a taken port exit 1; the real command on a loopback
port answers the openai client, and Ctrl-C (SIGINT) cancels the stream in flight and exits 130, SIGTERM
shuts down the same way."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402

from helpers_server import parse_prometheus, sample  # noqa: E402
from qwen2vl_fast.cli import main  # noqa: E402


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen2vl-fast: error: "), err
    return err[0]


def test_a_missing_checkpoint_is_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
    one_line_error(capsys)


def test_bad_options_are_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path), "--port", "70000"])
    assert e.value.code == 2 and "0..65535" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path), "--max-batch", "0"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["serve", "--model", str(tmp_path), "--allowed-local-media-path", str(tmp_path / "no")]) == 2
    assert "--allowed-local-media-path" in one_line_error(capsys)


def test_a_taken_port_is_exit_1(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys)


class Serve:
    """`python -m qwen2vl_fast.cli serve ...` on a free port; the URL comes from its start line."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen2vl_fast.cli", "serve", "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("qwen2vl-fast: serving"):
                break
        text = "".join(self.lines)
        m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)/v1", text)
        assert m, text
        self.url = m.group(1)

    def stop(self, sig) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
            self.proc.stderr.close()


def generated(server) -> float:
    return sample(parse_prometheus(httpx.get(server.url + "/metrics").text), "qwen2vl_fast_generated_tokens_total")


def test_serve_answers_and_ctrl_c_cancels_the_request_in_flight(tiny_checkpoints):
    server = Serve("--model", str(tiny_checkpoints["tiny-qwen2-vl"]), "--served-model-name", "tiny",
                   "--api-key", "k", "--max-len", "4096", "--max-batch", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0)
        assert done.usage.completion_tokens >= 1
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        before = generated(server)
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": "Bearer k"}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                deadline = time.monotonic() + 30
                while generated(server) < before + 2:  # until it decodes
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                server.proc.send_signal(signal.SIGINT)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "cancelled", rest[-3:]
        assert server.proc.wait(timeout=30) == 130
    finally:
        server.proc.kill()


def test_serve_shuts_down_on_sigterm(tiny_checkpoints):
    server = Serve("--model", str(tiny_checkpoints["tiny-qwen2-vl"]), "--max-len", "256")
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert server.stop(signal.SIGTERM) == -signal.SIGTERM  # uvicorn re-raises the signal once shut down
