"""The random-checkpoint writer, the CLI commands and the packaging rules."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qwen2vl_fast import cli
from qwen2vl_fast.config import load_config
from qwen2vl_fast.layout import hub_tensor_shapes
from qwen2vl_fast.testing.checkpoint_writer import random_tensor, write_random_checkpoint


def stored_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_writer_shards_index_and_exact_layout(tmp_path):
    path = write_random_checkpoint(tmp_path / "c", "tiny-qwen2.5-vl", dtype=torch.bfloat16,
                                   max_shard_bytes=4 << 20)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((path / f).exists() for f in files)
    cfg = load_config(path)
    tensors = stored_tensors(path)
    expected = hub_tensor_shapes(cfg)
    assert set(tensors) == set(expected) == set(index["weight_map"])
    assert all(tuple(tensors[k].shape) == expected[k] and tensors[k].dtype == torch.bfloat16 for k in tensors)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
              "generation_config.json"):
        assert (path / f).exists()
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_writer_is_deterministic_per_tensor_whatever_the_sharding(tmp_path):
    a = stored_tensors(write_random_checkpoint(tmp_path / "a", "tiny-qwen2-vl", dtype=torch.float32, seed=4))
    b = stored_tensors(write_random_checkpoint(tmp_path / "b", "tiny-qwen2-vl", dtype=torch.float32, seed=4,
                                               max_shard_bytes=1 << 20))
    c = stored_tensors(write_random_checkpoint(tmp_path / "c", "tiny-qwen2-vl", dtype=torch.float32, seed=5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    w = random_tensor("model.layers.0.mlp.up_proj.weight", (96, 64), torch.float32, seed=4)
    assert torch.equal(w, a["model.layers.0.mlp.up_proj.weight"]) and abs(float(w.std()) - 0.02) < 0.002


def test_writer_real_preset_configs_are_the_hub_sparse_ones():
    from qwen2vl_fast.presets import preset_config

    vc = preset_config("qwen2-vl-7b")["vision_config"]
    assert vc == {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}


def test_cli_write_checkpoint_presets_ops_and_demo(tmp_path, capsys):
    assert cli.main(["write-checkpoint", "--preset", "tiny-qwen2-vl", "--out", str(tmp_path / "w"),
                     "--dtype", "float32", "--max-shard-mb", "8"]) == 0
    assert "wrote tiny-qwen2-vl" in capsys.readouterr().out
    assert load_config(tmp_path / "w").model_type == "qwen2_vl"
    assert cli.main(["presets"]) == 0
    assert "qwen2.5-vl-72b" in capsys.readouterr().out
    assert cli.main(["ops", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["varlen_attention"]["auto"] == "torch"
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "w"), "--device", "cpu", "--image", "56", "84"]) == 0
    out = capsys.readouterr().out
    assert "[4/5] forward" in out and "grid [1, 4, 6]" in out


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_demo_with_transformers_check():
    out = subprocess.run([sys.executable, "-m", "qwen2vl_fast.cli", "demo", "--check", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    err = float(out.stdout.split("||Δlogits|| / ||logits|| = ")[1].split()[0])
    assert err <= 1e-4


def test_kernels_is_a_subpackage_never_top_level():
    import qwen2vl_fast.kernels  # noqa: F401

    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    assert subprocess.run([sys.executable, "-c", probe], cwd="/").returncode == 0


def test_setup_skips_the_cuda_extension_with_one_line_on_cpu_torch():
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    out = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    lines = [l for l in out.stdout.splitlines() if "qwen2vl_fast: skipping the CUDA extension" in l]
    assert len(lines) == 1 and "is not a CUDA build" in lines[0]


def test_cli_demo_with_a_real_image_file(tmp_path, capsys):
    from PIL import Image

    assert cli.main(["write-checkpoint", "--preset", "tiny-qwen2.5-vl", "--out", str(tmp_path / "w"),
                     "--dtype", "float32", "--max-shard-mb", "8"]) == 0
    Image.new("RGB", (90, 60), (200, 30, 30)).save(tmp_path / "red.png")
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "w"), "--device", "cpu",
                     "--image-file", str(tmp_path / "red.png")]) == 0
    out = capsys.readouterr().out
    assert "red.png -> grid [1, 4, 6]" in out and "[4/5] forward" in out


def test_cli_generate_streams_an_answer(tmp_path, capsys):
    from PIL import Image

    assert cli.main(["write-checkpoint", "--preset", "tiny-qwen2-vl", "--out", str(tmp_path / "w"),
                     "--dtype", "float32"]) == 0
    Image.new("RGB", (90, 60), (0, 90, 200)).save(tmp_path / "blue.png")
    assert cli.main(["generate", "--model", str(tmp_path / "w"), "--image", str(tmp_path / "blue.png"),
                     "--device", "cpu", "--max-new-tokens", "4", "--max-len", "512", "What is it?"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s]" in err and "prefill" in err
    assert cli.main(["generate", "--model", str(tmp_path / "w"), "--device", "cpu", "--temperature", "-1",
                     "hi"]) == 2
    assert "temperature" in capsys.readouterr().err
