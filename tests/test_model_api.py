"""The model's public surface: load() options, bad input as typed errors, and the model staying usable."""

import pytest
import torch

import qwen2vl_fast
from qwen2vl_fast import BackendError, InputError, Qwen2VLFastError

IMG, VS, VE = 151655, 151652, 151653


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], dtype="float32")


def image_inputs(grid=(1, 4, 6)):
    n = grid[0] * grid[1] * grid[2]
    ids = torch.tensor([[1, VS] + [IMG] * (n // 4) + [VE, 2]])
    return dict(input_ids=ids, pixel_values=torch.randn(n, 1176), image_grid_thw=torch.tensor([list(grid)]))


def test_call_returns_logits_like_transformers(model):
    out = model(**image_inputs())
    assert out.logits.shape == (1, 10, 151936) and out["logits"] is out.logits
    assert out.rope_deltas.shape == (1, 1)
    assert model.forward is not None and "qwen2_vl" in repr(model)


def test_dtype_auto_follows_the_checkpoint(tiny_checkpoints):
    assert qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2.5-vl"]).dtype == torch.float32  # written in fp32
    assert qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2.5-vl"], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_qwen25_vision_stays_bf16_when_fp16_is_asked(tiny_checkpoints):
    m = qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2.5-vl"], dtype="float16")
    assert m.dtype == torch.float16 and m.visual.dtype == torch.bfloat16


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("image_grid_thw"), "without image_grid_thw"),
    (lambda d: d.update(pixel_values=torch.randn(23, 1176)), "do not match the grids"),
    (lambda d: d.update(pixel_values=torch.randn(24, 1000)), "do not match the grids"),
    (lambda d: d.update(image_grid_thw=torch.tensor([[1, 4, 8]])), "placeholders do not match"),
    (lambda d: d.update(image_grid_thw=torch.tensor([[1, 3, 8]])), "grid_thw"),
    (lambda d: d.update(input_ids=torch.tensor([[1, 2, 10**6]])), "outside the vocabulary"),
    (lambda d: d.update(input_ids=torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
    (lambda d: d.update(input_ids=torch.ones(1, 4)), "integer tensor"),
    (lambda d: d.update(attention_mask=torch.ones(2, 10)), "attention_mask shape"),
])
def test_bad_input_is_a_typed_error_and_the_model_stays_usable(model, mutate, match):
    inputs = image_inputs()
    mutate(inputs)
    with pytest.raises(InputError, match=match):
        model(**inputs)
    good = image_inputs()
    assert torch.isfinite(model(**good).logits).all()


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int32])
def test_unsupported_dtype(tiny_checkpoints, dtype):
    with pytest.raises(InputError, match="dtype"):
        qwen2vl_fast.load(tiny_checkpoints["tiny-qwen2-vl"], dtype=dtype)


def test_backends(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["tiny-qwen2-vl"]
    assert qwen2vl_fast.load(path, backend="torch").ops.backend == "torch"
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        qwen2vl_fast.load(path, backend="tpu")
    monkeypatch.setenv("QWEN2VL_FAST_BACKEND", "nope")
    with pytest.raises(BackendError, match="QWEN2VL_FAST_BACKEND"):
        qwen2vl_fast.load(path)


def test_every_error_class_derives_from_the_base():
    for cls in (qwen2vl_fast.ConfigError, qwen2vl_fast.CheckpointError, InputError, BackendError):
        assert issubclass(cls, Qwen2VLFastError)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(Qwen2VLFastError, match="config.json"):
        qwen2vl_fast.load(tmp_path / "nowhere")


def test_logits_to_keep_and_explicit_position_ids(model):
    inputs = image_inputs()
    full = model(**inputs)
    last = model(**inputs, logits_to_keep=1)
    assert last.logits.shape == (1, 1, 151936) and torch.allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-5)
    from qwen2vl_fast.positions import mrope_position_ids

    pos, _ = mrope_position_ids(model.config, inputs["input_ids"], None, inputs["image_grid_thw"])
    same = model(**inputs, position_ids=pos)
    assert torch.equal(same.logits, full.logits) and torch.equal(same.rope_deltas, full.rope_deltas)
    shifted = model(**inputs, position_ids=pos + 5)
    assert not torch.allclose(shifted.logits, full.logits)
    with pytest.raises(InputError, match="position_ids shape"):
        model(**inputs, position_ids=pos[:, :, :3])


def test_transformers_arguments_we_do_not_implement_are_refused(model):
    inputs = image_inputs()
    model(**inputs, use_cache=False, return_dict=True, output_attentions=False)
    for bad in (dict(output_hidden_states=True), dict(past_key_values=object()), dict(labels=torch.zeros(1))):
        with pytest.raises(InputError, match="not supported"):
            model(**inputs, **bad)


def test_pixel_frames_path_equals_pixel_values_path(model, tiny_checkpoints):
    """Resized uint8 frames through the fused patch embedding give the same logits as pixel_values."""
    from PIL import Image

    from qwen2vl_fast.processing.processor import Processor

    proc = Processor.from_pretrained(tiny_checkpoints["tiny-qwen2-vl"])
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (98, 70), (10, 200, 30))},
                                         {"type": "image", "image": Image.new("RGB", (60, 120), (250, 0, 90))},
                                         {"type": "text", "text": "two"}]}]
    values, frames = proc(chat), proc(chat, return_pixel_frames=True)
    assert "pixel_values" not in frames and [f.dtype for f in frames["pixel_frames"]] == [torch.uint8] * 2
    assert torch.equal(values["input_ids"], frames["input_ids"])
    assert torch.allclose(model(**values).logits, model(**frames).logits, rtol=1e-5, atol=1e-5)
    bad = dict(frames, pixel_frames=[f.float() for f in frames["pixel_frames"]])
    with pytest.raises(InputError, match="expected uint8"):
        model(**bad)
    with pytest.raises(InputError, match="not both"):
        model(**frames, pixel_values=values["pixel_values"])
