"""Errors name the real cause (issue 11, items 4, 5 and 7): devices, paths, tokenizers, videos, configs, media
indices, quantization configs, and the CLI's one-line errors and exit codes."""

import copy
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl_fast
from qwen2vl_fast.config import parse_config
from qwen2vl_fast.errors import (CheckpointError, ConfigError, DeviceError, ImageError, PromptError,
                                 TokenizerError, VideoError)
from qwen2vl_fast.presets import PRESETS
from qwen2vl_fast.processing.image import ImageProcessor
from qwen2vl_fast.processing.video import VideoProcessor, load_video
from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny-qwen2-vl", dtype=torch.float32)


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "qwen2vl_fast.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


# ---- item 4: errors that named the wrong cause ----

@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_named_before_any_work(ckpt, tmp_path, monkeypatch):
    for dev in ("cuda", "cuda:3"):
        with pytest.raises(DeviceError, match=f"device '{dev}' is not available: .*(CPU-only|no CUDA device)"):
            qwen2vl_fast.load(ckpt, device=dev)
    with pytest.raises(DeviceError, match="'banana' is not a device name"):
        qwen2vl_fast.load(ckpt, device="banana")
    from qwen2vl_fast.testing import checkpoint_writer

    def no_write(*a, **k):
        raise AssertionError("demo wrote a checkpoint before checking the device")
    monkeypatch.setattr(checkpoint_writer, "write_random_checkpoint", no_write)
    from qwen2vl_fast import cli

    assert cli.main(["demo", "--device", "cuda"]) == 2


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    from qwen2vl_fast.model import check_device

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"'cuda:3' is not available: only 1 CUDA device\(s\) visible"):
        check_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device visible"):
        check_device("cuda")


def test_checkpoint_path_that_is_a_file(ckpt):
    with pytest.raises(CheckpointError, match="config.json' is a file; a checkpoint is the directory"):
        qwen2vl_fast.load(ckpt / "config.json")


def test_garbage_tokenizer_fails_at_load_not_at_generate(ckpt, tmp_path):
    from qwen2vl_fast.engine import Engine

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "tokenizer.json").write_text("this is not a tokenizer")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable tokenizer") as err:
        Engine.from_pretrained(bad, device="cpu", cuda_graphs=False, max_batch=1, max_len=64)
    assert not isinstance(err.value, PromptError)  # the engine tolerates only a *missing* tokenizer
    (bad / "tokenizer.json").unlink()
    engine = Engine.from_pretrained(bad, device="cpu", cuda_graphs=False, max_batch=1, max_len=64)
    assert engine.processor is None


def test_text_file_given_as_a_video(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"line {i} of some plain notes" for i in range(40)))
    with pytest.raises(VideoError, match=f"{path}: not a decodable video"):
        load_video(str(path))


def test_edited_hidden_size_is_named():
    for preset in ("qwen2-vl-2b", "tiny-qwen2.5-vl"):
        raw = copy.deepcopy(PRESETS[preset])
        raw["hidden_size"] //= 2
        with pytest.raises(ConfigError, match=r"hidden_size \d+$"):
            parse_config(raw)
        vision = raw["vision_config"]
        vision["out_hidden_size" if "out_hidden_size" in vision else "hidden_size"] = raw["hidden_size"]
        with pytest.raises(ConfigError, match=r"^head_dim \d+ \(hidden_size \d+ / num_attention_heads"):
            parse_config(raw)


def test_media_indices_are_one_based():
    good = Image.new("RGB", (56, 56))
    with pytest.raises(ImageError, match="image 2 of 2: "):
        ImageProcessor()([good, 3.5])
    frames = [np.zeros((56, 56, 3), np.uint8)] * 2
    with pytest.raises(VideoError, match="video 2 of 2: .*missing.png"):
        VideoProcessor()([frames, ["/nonexistent/missing.png"]])


def test_quantization_config_over_float_weights_warns(tmp_path):
    raw = copy.deepcopy(PRESETS["tiny-qwen2-vl"])
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    path = write_random_checkpoint(tmp_path / "q", config=raw, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qwen2vl_fast.load(path)
    msgs = [str(w.message) for w in caught if "quantization_config" in str(w.message)]
    assert len(msgs) == 1 and str(path) in msgs[0] and "floating point" in msgs[0], msgs


# ---- item 5: the CLI prints one line, never a traceback ----

def _one_line_error(proc, status):
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("qwen2vl-fast: error: ")
    return proc.stderr


def test_cli_bad_device_and_output_path_exit_2(tmp_path):
    assert "'banana' is not a device name" in _one_line_error(run_cli("ops", "--device", "banana"), 2)
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "x")
    assert "cannot create the directory" in _one_line_error(run_cli("write-checkpoint", "--preset", "tiny-qwen2-vl",
                                                                    "--out", out), 2)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cli_ops_cuda_without_cuda_says_so():
    proc = run_cli("ops", "--device", "cuda")
    assert "device 'cuda' is not available" in _one_line_error(proc, 2)
    assert "triton" not in proc.stdout


def test_cli_runtime_failure_is_one_line_exit_1(monkeypatch, capsys):
    from qwen2vl_fast import cli

    def broken(args):
        raise RuntimeError("CUDA out of memory\nmore detail")
    monkeypatch.setattr(cli, "_cmd_presets", broken)
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: CUDA out of memory" in err


def test_cli_ctrl_c_during_generate_exits_130_quietly(ckpt, monkeypatch, capsys):
    from qwen2vl_fast import cli
    from qwen2vl_fast.engine import Engine

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(Engine, "stream", interrupted)
    assert cli.main(["generate", "--model", str(ckpt), "--device", "cpu", "--no-cuda-graphs", "hi"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_cli_sigint_exits_130_without_a_traceback():
    code = ("import sys, time\nfrom qwen2vl_fast import cli\n"
            "def wait(args):\n    print('ready', flush=True)\n    time.sleep(60)\n"
            "cli._cmd_presets = wait\nsys.exit(cli.main(['presets']))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


# ---- item 7: `ops` says whether the CUDA extension is built ----

def test_cli_ops_reports_the_cuda_extension(tmp_path, capsys):
    from qwen2vl_fast import cli

    assert cli.main(["ops", "--device", "cpu", "--cache", str(tmp_path / "dispatch.json")]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("CUDA extension qwen2vl_fast._C: ")]
    assert len(lines) == 1, lines
    if torch.version.cuda is None:
        assert lines[0].endswith(f"not built (torch {torch.__version__} is a CPU-only build)")
    else:
        assert lines[0].endswith(": built") or "not built (" in lines[0]
