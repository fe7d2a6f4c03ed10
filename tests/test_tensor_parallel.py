"""Tensor parallelism over torch.distributed (gloo, CPU): 2 and 4 worker processes started like torchrun.

Each rank loads the tiny checkpoints with `tensor_parallel=True` and must return the single-process model's
logits within 1e-4 (fp32) on text, image and video prompts for both families, the same bits on every rank, the
same greedy `Engine.generate` tokens, a rank-local KV cache, and hold about 1/N of the sharded weights plus the
replicated vision tower, read from the files as slices. A rank count the model cannot be split over fails on
every rank with the same clear error, and a load that fails on one rank fails on all: no rank hangs (the parent
kills the workers after a timeout). GPTQ and AWQ checkpoints shard along their groups, padded where needed, and
GPTQ act-order ones too (row splits off the groups gather their input). `generate --tensor-parallel` and
`serve --tensor-parallel` run under a torchrun-like environment with rank 0 talking to the user. The CUDA-graph /
NCCL checks are marked `gpu`.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers_tp import run_cli, run_ranks, start_ranks, stop_ranks, wait_for_line
from PIL import Image

import qwen2vl_fast
from qwen2vl_fast.config import load_config
from qwen2vl_fast.engine import Engine
from qwen2vl_fast.layout import hub_tensor_shapes
from qwen2vl_fast.parallel import TensorParallel, TensorParallelError, _working_counts
from qwen2vl_fast.testing.checkpoint_writer import write_random_checkpoint

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
CASES = ["text", "image", "video"]
IMG, VID, VS, VE = 151655, 151656, 151652, 151653
SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


def _ids(*parts):
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(0, 5000, (part,)).tolist()
        else:
            kind, grid = part
            ids += [VS] + [IMG if kind == "image" else VID] * (math.prod(grid) // 4) + [VE]
    return torch.tensor([ids])


def cases(family: str) -> dict:
    g, vg = [1, 4, 6], [2, 4, 4]
    video = dict(input_ids=_ids(3, ("video", vg), 4), pixel_values_videos=torch.randn(math.prod(vg), 1176),
                 video_grid_thw=torch.tensor([vg]))
    if "2.5" in family:
        video["second_per_grid_ts"] = torch.tensor([1.0])
    return {"text": dict(input_ids=_ids(11)),
            "image": dict(input_ids=_ids(3, ("image", g), 5), pixel_values=torch.randn(math.prod(g), 1176),
                          image_grid_thw=torch.tensor([g])),
            "video": video}


def chats():
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    return [[{"role": "user", "content": [{"type": "image", "image": picture},
                                          {"type": "text", "text": "What is in the picture?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]]


# Quantized checkpoints: GPTQ with 32-wide groups (round-to-nearest, published format) at 2 ranks, where
# down_proj's 96 inputs = 3 groups are padded to 4 (2 per rank); AWQ with 16-wide groups at 4 ranks, 6 groups
# padded to 8 (o_proj's split, 32 or 16 columns per rank, is one whole group in both); GPTQ act-order with its own
# random g_idx per projection (q/k/v and gate/up load as QuantizedParts) at 2 and 4 ranks: o_proj and down_proj
# split off the groups, read as whole groups of scattered rows with a gathered input (parallel.GatheredInput).
# "gptq_act_order_halves": every 64-wide input's g_idx keeps each half of the input in whole groups, the two
# halves' groups swapped, so at 2 ranks o_proj's input split holds whole groups (renumbered in order, no gather)
# while down_proj's (96 = 3 random groups, 64 columns per rank) still gathers.
QUANT = {"gptq": ("tiny-qwen2.5-vl", dict(fmt="gptq", group_size=32), (2,)),
         "awq": ("tiny-qwen2-vl", dict(fmt="awq", group_size=16), (4,)),
         "gptq_act_order": ("tiny-qwen2.5-vl", None, (2, 4)),
         "gptq_act_order_halves": ("tiny-qwen2-vl", "halves", (2,))}
GATHERED = {"gptq_act_order": {"self_attn.o_proj", "mlp.down_proj"}, "gptq_act_order_halves": {"mlp.down_proj"}}


def write_act_order_halves(path) -> None:
    """GPTQ-v1 act-order linears whose 64-wide inputs keep groups within halves (swapped), see QUANT."""
    import json
    import os

    from safetensors.torch import load_file, save_file
    from test_quant_act_order_parts import random_act_order

    from qwen2vl_fast.quant.formats import to_gptq

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(11)
    for name in [n for n in tensors if n.startswith("model.layers.") and n.endswith("proj.weight")]:
        prefix = name[: -len(".weight")]
        n, k = tensors.pop(name).shape
        if k == 64:
            perm = torch.cat([32 + torch.randperm(32, generator=gen), torch.randperm(32, generator=gen)])
        else:
            perm = torch.randperm(k, generator=gen)
        w = random_act_order(n, k, perm, gen)
        tensors.update({f"{prefix}.{key}": v for key, v in to_gptq(w, version=1).items()})
    save_file(tensors, file)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                  "sym": False, "checkpoint_format": "gptq"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def refs(tiny_checkpoints, tmp_path_factory):
    """Per checkpoint (both families, and the quantized ones): the inputs, the single-process logits and greedy
    tokens, and the checkpoint's bytes split into the sharded linears / embeddings and the replicated rest
    (vision tower, norms)."""
    from qwen2vl_fast.quant.export import quantize_checkpoint

    torch.manual_seed(0)
    out = {}
    paths = {f: (f, str(tiny_checkpoints[f])) for f in FAMILIES}
    for name, (family, kw, _) in QUANT.items():
        if kw is None or kw == "halves":
            from test_quant_act_order_parts import write_act_order

            path = write_random_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", family, dtype=torch.float32,
                                           seed=2, std=0.15)
            if kw is None:
                write_act_order(path, shared=False)
            else:
                write_act_order_halves(path)
            paths[name] = (family, str(path))
        else:
            paths[name] = (family, str(quantize_checkpoint(tiny_checkpoints[family], tmp_path_factory.mktemp(name),
                                                           bits=4, method="rtn", **kw)))
    for key, (family, path) in paths.items():
        inputs = cases(family)
        model = qwen2vl_fast.load(path, dtype=torch.float32, backend="torch")
        logits = {c: model(**kw).logits for c, kw in inputs.items()}
        engine = Engine.from_pretrained(path, dtype=torch.float32, backend="torch", max_batch=4, max_len=512)
        tokens = [list(c.token_ids) for c in engine.generate(chats(), max_new_tokens=8)]
        engine.close()
        shapes = hub_tensor_shapes(load_config(path))
        sharded = sum(4 * math.prod(s) for n, s in shapes.items() if any(k in n for k in SPLIT))
        replicated = sum(4 * math.prod(s) for n, s in shapes.items() if not any(k in n for k in SPLIT))
        out[key] = dict(path=path, inputs=inputs, logits=logits, tokens=tokens, sharded=sharded,
                        replicated=replicated, repr=repr(model))
    # bf16: the single-process bf16 logits of the Qwen2.5-VL inputs (their fp32 ones are the reference)
    f32 = out[FAMILIES[1]]
    bf16 = qwen2vl_fast.load(f32["path"], dtype=torch.bfloat16, backend="torch")
    out["bf16"] = dict(path=f32["path"], inputs=f32["inputs"],
                       logits={c: bf16(**kw).logits.float() for c, kw in f32["inputs"].items()})
    return out


def _jobs(refs, keys, extra=()):
    return [dict(name=k, path=refs[k]["path"], dtype="float32", inputs=refs[k]["inputs"], chats=chats(),
                 max_new_tokens=8) for k in keys] + list(extra)


@pytest.fixture(scope="module")
def run2(refs, tmp_path_factory):
    bad = dict(name="bad_rank", path=refs[FAMILIES[0]]["path"], dtype="float32", bad_path_on=1)
    bf16 = dict(name="bf16", path=refs["bf16"]["path"], dtype="bfloat16", inputs=refs["bf16"]["inputs"])
    keys = FAMILIES + [k for k, q in QUANT.items() if 2 in q[2]]
    return run_ranks(2, _jobs(refs, keys, [bad, bf16]), tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def run4(refs, tmp_path_factory):
    keys = FAMILIES + [k for k, q in QUANT.items() if 4 in q[2]]
    return run_ranks(4, _jobs(refs, keys), tmp_path_factory.mktemp("tp4"))


def _results(request, n):
    return request.getfixturevalue(f"run{n}")


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_single_process(request, refs, n, family):
    ranks = _results(request, n)
    for case in CASES:
        ours, ref = ranks[0][family]["logits"][case], refs[family]["logits"][case]
        assert ours.shape == ref.shape
        err = (ours - ref).abs().max().item()
        assert err < 1e-4, f"{n} ranks, {family}, {case}: max |logit diff| {err}"
        # every rank got the very same full logits (the all-gather hands out one tensor)
        assert len({r[family]["digests"][case] for r in ranks}) == 1, f"ranks disagree on {case}"


def test_bf16_logits_within_twice_the_single_process_bf16_error(run2, refs):
    """bf16 at 2 ranks: the partial sums are added in another order than one GEMM adds them, so not the same bits;
    their error against the fp32 model stays within twice the single-process bf16 error (and ranks agree)."""
    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    for case in CASES:
        fp32 = refs[FAMILIES[1]]["logits"][case]
        ours, single = run2[0]["bf16"]["logits"][case], refs["bf16"]["logits"][case]
        assert rel(ours, fp32) <= 2 * rel(single, fp32) + 1e-3, case
        assert len({r["bf16"]["digests"][case] for r in run2}) == 1


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_tokens_identical(request, refs, n, family):
    ranks = _results(request, n)
    for r, res in enumerate(ranks):
        assert res[family]["tokens"] == refs[family]["tokens"], f"rank {r} of {n}"


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_rank_config_and_kv_cache_hold_the_rank_share(request, n, family):
    """4 query heads over 2 KV heads: 2 ranks split both; 4 ranks hold 1 query head each and replicate the KV
    head it reads; the KV cache follows the rank's config; the MLP width is split (96 / n)."""
    for r, res in enumerate(_results(request, n)):
        t = res[family]["text"]
        assert t == dict(heads=4 // n, kv_heads=1, head_dim=16, intermediate=96 // n)
        assert res[family]["cache_kv_heads"] == 1
        # repr: the whole checkpoint's parameter count, and which rank this is
        assert res[family]["repr"] == refs_repr(request, family)[:-1] + f", tensor_parallel=rank {r} of {n})"


def refs_repr(request, family):
    return request.getfixturevalue("refs")[family]["repr"]


def test_tensor_parallel_without_a_process_group_says_how(refs):
    with pytest.raises(TensorParallelError, match="torchrun"):
        qwen2vl_fast.load(refs[FAMILIES[0]]["path"], tensor_parallel=True)
    with pytest.raises(TensorParallelError, match="ProcessGroup"):
        qwen2vl_fast.load(refs[FAMILIES[0]]["path"], tensor_parallel=2)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_rank_memory_is_one_nth_of_sharded_weights_plus_vision(request, refs, n, family):
    """Measured: the bytes of each rank's weight tensors (storages counted once) and of what it read from the
    safetensors files, against sharded / n + replicated (the small excess: zero padding of the MLP share to 64
    columns, and at 4 ranks the KV head replicated on two ranks); and the load's peak resident memory (VmHWM,
    reset before the load), which also holds, for a moment, one group's memory-mapped slice next to its copy, and
    the library code the load pages in (a fixed ~15 MB that dwarfs these tiny models): bounded by twice the
    rank's share plus 24 MiB, where reading the whole embedding and head on a rank would exceed it."""
    ref = refs[family]
    expected = ref["sharded"] / n + ref["replicated"]
    whole = ref["sharded"] + ref["replicated"]
    for r, res in enumerate(_results(request, n)):
        for key in ("weight_bytes", "bytes_read"):
            got = res[family][key]
            assert 0.98 * expected <= got <= 1.03 * expected, f"rank {r}: {key} {got} vs {expected:.0f}"
            assert got < (1 / n + 0.05) * whole
        assert res[family]["load_peak_bytes"] < 2 * expected + (24 << 20), f"rank {r}"


def test_unshardable_rank_count_fails_on_every_rank_without_hang(refs, tmp_path):
    """4 query heads cannot be split over 3 ranks: every rank raises the same TensorParallelError (naming the
    rank counts that work) before any collective, and all three exit."""
    job = dict(name="three", path=refs[FAMILIES[1]]["path"], dtype="float32")
    ranks = run_ranks(3, [job], tmp_path, timeout=120)
    for r, res in enumerate(ranks):
        kind, msg = res["three"]["error"]
        assert kind == "TensorParallelError"
        assert "over 3 ranks" in msg and f"rank {r}" in msg and "4 query heads" in msg
        assert "rank counts that shard this model: 2, 4" in msg


def test_failed_load_on_one_rank_fails_every_rank(run2):
    """Rank 1 cannot read its checkpoint (a missing directory: no config.json): it raises its own error, rank 0
    (whose load worked) learns it in the load's closing agreement and raises too, instead of waiting in the
    first collective."""
    kind0, msg0 = run2[0]["bad_rank"]["error"]
    kind1, msg1 = run2[1]["bad_rank"]["error"]
    assert kind1 == "ConfigError" and "-missing" in msg1
    assert kind0 == "TensorParallelError" and "failed on another rank" in msg0


def test_cli_generate_tensor_parallel_prints_the_single_process_answer_once(refs, capsys):
    """`torchrun --nproc-per-node 2 qwen2vl-fast generate --tensor-parallel ...`: rank 0 prints the answer the
    single-process command prints; rank 1 prints nothing."""
    from qwen2vl_fast import cli

    argv = ["generate", "Say hello.", "--model", refs[FAMILIES[1]]["path"], "--device", "cpu", "--dtype", "float32",
            "--backend", "torch", "--max-new-tokens", "6", "--no-cuda-graphs"]
    assert cli.main(argv) == 0
    single = capsys.readouterr().out
    ranks = run_cli(2, argv + ["--tensor-parallel"])
    assert [rc for rc, _, _ in ranks] == [0, 0], [err[-2000:] for _, _, err in ranks]
    assert ranks[0][1] == single and ranks[1][1] == ""
    assert "tokens/s" in ranks[0][2] and "tokens/s" not in ranks[1][2]


@pytest.mark.parametrize("key, n", [(k, n) for k, q in QUANT.items() for n in q[2]])
def test_quantized_checkpoint_shards_along_groups_with_padding(request, refs, key, n):
    """GPTQ at 2 ranks, AWQ at 4, GPTQ act-order at 2 and 4: logits within 1e-4 of the single-process quantized
    model on text, image and video, the same bits on every rank, the same greedy tokens; each rank's MLP share is
    whole groups (the padded width: 128 = 4 groups of 32, 128 = 8 groups of 16)."""
    _, kw, _ = QUANT[key]
    group = kw["group_size"] if isinstance(kw, dict) else 32
    ranks = _results(request, n)
    for case in CASES:
        ours, ref = ranks[0][key]["logits"][case], refs[key]["logits"][case]
        err = (ours - ref).abs().max().item()
        assert err < 1e-4, f"{key} at {n} ranks, {case}: max |logit diff| {err}"
        assert len({r[key]["digests"][case] for r in ranks}) == 1
    for r, res in enumerate(ranks):
        assert res[key]["tokens"] == refs[key]["tokens"], f"rank {r}"
        assert res[key]["text"]["intermediate"] == max(128 // n, group)
        assert res[key]["text"]["intermediate"] % group == 0
        # act-order: the o_proj / down_proj splits off their scattered groups gather their input
        gathered = {p.split(".", 3)[3] for p in res[key]["gathered"]}
        assert gathered == GATHERED.get(key, set())
        assert len(res[key]["gathered"]) == 2 * len(GATHERED.get(key, ()))


def test_cli_serve_tensor_parallel_rank0_answers_and_every_rank_stops(refs, tmp_path):
    """`torchrun --nproc-per-node 2 qwen2vl-fast serve --tensor-parallel`: rank 0 listens and answers with the
    single-process engine's greedy text (rank 1 runs the same steps, `Engine.follow`); SIGTERM to rank 0 ends
    both."""
    import re
    import signal

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    path = refs[FAMILIES[1]]["path"]
    chat = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    engine = Engine.from_pretrained(path, dtype=torch.float32, backend="torch", max_batch=4, max_len=512)
    expected = engine.generate(chat, max_new_tokens=8, ignore_eos=True)[0].text
    engine.close()
    procs = start_ranks(2, ["serve", "--port", "0", "--model", path, "--device", "cpu", "--dtype", "float32",
                            "--max-batch", "4", "--max-len", "512", "--tensor-parallel"], tmp_path)
    try:
        line = wait_for_line(tmp_path / "cli0.log", "qwen2vl-fast: serving", procs)
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        body = {"model": path, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
    finally:
        procs[0][0].send_signal(signal.SIGTERM)
        codes = stop_ranks(procs)
    logs = [(tmp_path / f"cli{r}.log").read_text()[-2000:] for r in range(2)]
    assert codes == [-signal.SIGTERM, 0], logs  # uvicorn re-raises the signal once shut down; rank 1 returns


# -- GPU (owed where no GPU was available: NCCL, CUDA graphs) ------------------------------------------------


@pytest.mark.gpu
def test_cuda_graphs_capture_the_collectives_on_one_gpu(refs, tmp_path):
    """One GPU, a one-rank NCCL group: the decode CUDA graphs capture the all-reduces and the all-gathers (the
    code path of N GPUs) and give the greedy tokens of an eager engine without tensor parallelism."""
    job = dict(name="g", path=refs[FAMILIES[1]]["path"], dtype="float32", chats=chats(), max_new_tokens=8,
               graphs_tp1=True)
    [res] = run_ranks(1, [job], tmp_path, timeout=400, backend="nccl")
    assert res["g"]["graphs"], "no decode graph was captured"
    assert res["g"]["tokens"] == res["g"]["eager_tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_gpus_logits_and_graph_tokens(refs, tmp_path):
    """2 GPUs over NCCL, fp32: logits within 1e-4 of the single-process CPU model, greedy tokens (decoded on CUDA
    graphs holding the collectives) equal to the CPU engine's."""
    key = FAMILIES[1]
    job = dict(name=key, path=refs[key]["path"], dtype="float32", inputs=refs[key]["inputs"], chats=chats(),
               max_new_tokens=8, device="cuda", backend="torch")  # torch: fp32 GEMMs without TF32
    ranks = run_ranks(2, [job], tmp_path, timeout=500, backend="nccl")
    for case in CASES:
        assert (ranks[0][key]["logits"][case] - refs[key]["logits"][case]).abs().max().item() < 1e-4, case
    for res in ranks:
        assert res[key]["cuda_graphs"] and res[key]["tokens"] == refs[key]["tokens"]


# -- the plan alone (no processes) ----------------------------------------------------------------------------


def _cfg(**text):
    cfg = load_config_preset("tiny-qwen2-vl")
    return cfg.replace(text=dataclasses.replace(cfg.text, **text)) if text else cfg


def load_config_preset(name):
    from qwen2vl_fast.config import parse_config
    from qwen2vl_fast.presets import preset_config

    return parse_config(preset_config(name))


def test_plan_refuses_more_ranks_than_query_heads():
    with pytest.raises(TensorParallelError, match="8 ranks exceed the 4 query heads"):
        TensorParallel(0, 8, _cfg())
    assert _working_counts(_cfg(), None) == [1, 2, 4]


def test_plan_refuses_kv_heads_that_neither_split_nor_replicate():
    cfg = load_config_preset("qwen2-vl-7b")  # 28 query heads, 4 KV heads: 7 ranks hold 4 query heads each
    with pytest.raises(TensorParallelError, match="4 KV heads can be neither split over 7 ranks"):
        TensorParallel(0, 7, cfg)
    assert TensorParallel(1, 2, cfg).kv_start == 2 and TensorParallel(27, 28, cfg).kv_start == 3
    assert _working_counts(cfg, None) == [1, 2, 4, 28]


def test_plan_72b_shares():
    """bf16: 29568 / n columns per rank; GPTQ/AWQ with 128-wide groups: 231 groups padded to 232 (29696, Qwen's own
    padding), 29696 / n per rank, the last rank's share ending in the zero group."""
    from qwen2vl_fast.quant.config import QuantConfig

    cfg = load_config_preset("qwen2-vl-72b")
    for method in ("gptq", "awq"):
        qcfg = QuantConfig.from_config({"quantization_config": {"quant_method": method, "bits": 4,
                                                                 "group_size": 128}})
        for n in (2, 4, 8):
            tp = TensorParallel(n - 1, n, cfg)
            assert (tp.q_heads, tp.kv_heads, tp.inter) == (64 // n, 8 // n, 29568 // n)
            local = tp.local_config().text
            assert local.head_dim == 128 and local.num_attention_heads == 64 // n
            assert local.num_key_value_heads == 8 // n and local.intermediate_size == 29568 // n
            q = TensorParallel(n - 1, n, cfg, qcfg=qcfg)
            assert q.padded_intermediate == 29696 and q.inter % 128 == 0
            assert q.linear_split("model.layers.3.mlp.down_proj") == ("row", 29696 - 29696 // n, 29696)
            assert q.linear_split("model.layers.3.self_attn.o_proj") == ("row", 8192 - 8192 // n, 8192)


def test_row_mode_picks_contiguous_regrouped_or_gathered():
    tp = TensorParallel(0, 2, _cfg())
    k, gs = 128, 32
    trivial = torch.arange(k) // gs
    assert tp._row_mode(k, gs, 8, 64, None) == "contiguous"
    assert tp._row_mode(k, gs, 8, 64, trivial) == "contiguous"
    assert tp._row_mode(k, gs, 8, 16, None) == "gathered"      # a share narrower than a group
    swapped = torch.cat([trivial[64:], trivial[:64]])           # whole groups per half, in another order
    assert tp._row_mode(k, gs, 8, 64, swapped) == "regrouped"
    assert tp._row_mode(k, gs, 8, 64, trivial[torch.randperm(k)]) == "gathered"
    assert tp._row_mode(k, -1, 8, 64, None) == "contiguous"    # one group: every rank keeps its scales
