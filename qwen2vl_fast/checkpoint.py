"""Safetensors checkpoint directory -> the runtime ("fused") tensors of `layout.fused_tensor_shapes(cfg)`.

Reads `model.safetensors` or the shards named by `model.safetensors.index.json`, in either key scheme (hub
`visual.*`/`model.*` or transformers >= 4.52 `model.visual.*`/`model.language_model.*`). Every header is
parsed and checked (truncation, names, shapes, dtypes) before any tensor data is read, so a broken checkpoint
fails in milliseconds with a message naming the file and the tensor. Tensors are then read one fusion group
at a time straight onto the target device, so host memory peaks near one group, never the whole model.
Nothing is unpickled: `.bin`/`.pt` checkpoints are refused, not loaded.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import warnings
from contextlib import ExitStack

import torch
from safetensors import SafetensorError, safe_open

from . import layout
from .config import ModelConfig
from .errors import CheckpointError
from .quant.config import QuantConfig
from .quant.formats import fuse_quantized, load_quantized_linear

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PROGRESS_MIN_BYTES = 1 << 30  # progress=None shows a bar only for checkpoints above 1 GiB
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_LISTED = 10


def _listing(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _index(path: str) -> dict[str, str] | None:
    """Stored tensor name -> shard path from `model.safetensors.index.json`; None when there is no index."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: unreadable shard index, expected "
                              f'{{"weight_map": {{tensor: file}}}} ({type(e).__name__}: {e})') from None
    out = {}
    for name, file in weight_map.items():
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise CheckpointError(f"missing shard {full} (listed in {INDEX_FILE} for tensor {name})")
        out[name] = full
    return out


def checkpoint_files(path) -> list[str]:
    """The safetensors files holding a checkpoint directory's weights (absolute paths, sorted)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a file; a checkpoint is the directory holding "
                              f"config.json and the .safetensors files (here {os.path.dirname(path)!r}?)")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    weight_map = _index(path)
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    # Shards that lost their index still make an unambiguous checkpoint (a name stored twice is refused).
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    pickled = sorted(os.path.basename(f) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                     for f in glob.glob(os.path.join(path, ext)))
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickled weights ({', '.join(pickled)}): only safetensors checkpoints are "
            "supported, since unpickling can run arbitrary code; re-save with safe_serialization=True")
    raise CheckpointError(f"no safetensors files ({SINGLE_FILE} or {INDEX_FILE}) in {path}")


def _scan(path: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(stored tensor name -> file, file -> parsed header) for every file of the checkpoint."""
    headers = {file: _read_header(file) for file in checkpoint_files(path)}
    weight_map = _index(path)
    if weight_map is None:
        weight_map = {}
        for file, header in headers.items():
            for name in header:
                if name in weight_map:
                    raise CheckpointError(f"tensor {name} is stored in both {weight_map[name]} and {file}")
                weight_map[name] = file
    for name, file in weight_map.items():
        if name not in headers[file]:
            raise CheckpointError(f"tensor {name} is listed in {INDEX_FILE} under {file}, "
                                  "but that file does not contain it")
    return weight_map, headers


def _read_header(file: str) -> dict[str, dict]:
    """Parse a safetensors header ourselves: a truncated download must fail with the file and tensor named,
    before safetensors maps the file (which may report only an offset, or nothing until a read faults)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError(f"file is {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if 8 + n > size:
                raise ValueError(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and isinstance(info.get("shape"), list) and isinstance(info.get("dtype"), str)):
                raise ValueError(f"entry for tensor {name} lacks dtype/shape/data_offsets")
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
    available = size - 8 - n
    beyond = [name for name, info in header.items() if info["data_offsets"][1] > available]
    if beyond:
        first = min(beyond, key=lambda name: header[name]["data_offsets"][0])
        need = 8 + n + max(info["data_offsets"][1] for info in header.values())
        raise CheckpointError(f"{file} is truncated: {size} bytes, the header needs {need}; tensor {first} "
                              f"(and {len(beyond) - 1} more) lie beyond the end of the file")
    return header


def _check(entries: dict, config: ModelConfig) -> None:
    """Names, shapes and dtypes against `layout.hub_tensor_shapes`; `entries` is canonical name -> (file, info)."""
    tied = config.text.tie_word_embeddings
    expected = layout.hub_tensor_shapes(config, include_lm_head=not tied)
    known = layout.hub_tensor_shapes(config, include_lm_head=True)
    problems = []
    missing = [n for n in expected if n not in entries]
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_listing(missing)}")
    unexpected = [n for n in entries if n not in known]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_listing(unexpected)} "
                        f"(is this a {config.model_type} checkpoint matching config.json?)")
    for name, (file, info) in entries.items():
        if name not in expected:
            continue
        if tuple(info["shape"]) != tuple(expected[name]):
            problems.append(f"tensor {name} in {file}: expected shape {tuple(expected[name])}, "
                            f"found {tuple(info['shape'])}")
        elif info["dtype"] not in _FLOAT_DTYPES:
            problems.append(f"tensor {name} in {file} has dtype {info['dtype']} where a floating-point weight "
                            "is expected: quantized checkpoints are not supported by this loader yet")
    if problems:
        raise CheckpointError("checkpoint does not match config.json:\n  " + "\n  ".join(problems))


_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_OWN_SLICE = object()  # read(): the slice the tensor-parallel shard assigns (the whole tensor without one)


def _split_quantized(entries: dict, config: ModelConfig, qcfg: QuantConfig) -> tuple[set, set]:
    """(prefixes of linears stored quantized, names of their tensors). Only the language model's linears
    (and lm_head) may be quantized; a linear stored as a float `weight` stays floating (modules_to_not_convert,
    or a dense layer the quantizer left alone)."""
    known = layout.hub_tensor_shapes(config, include_lm_head=True)
    prefixes = {n[: -len(".qweight")] for n in entries if n.endswith(".qweight")}
    names = set()
    for p in sorted(prefixes):
        if not (p.startswith("model.layers.") or p == "lm_head") or p + ".weight" not in known:
            raise CheckpointError(f"tensor {p}.qweight: only the language model's linear layers may be stored "
                                  "quantized (the vision tower, norms and embeddings stay floating)")
        if qcfg.skips(p):
            raise CheckpointError(f"tensor {p}.qweight: {p} is listed in quantization_config."
                                  "modules_to_not_convert but stored quantized")
        if p + ".weight" in entries:
            raise CheckpointError(f"{p} is stored both as a float weight and quantized ({p}.qweight)")
        names.update(n for n in (f"{p}.{s}" for s in _QUANT_SUFFIXES) if n in entries)
    return prefixes, names


def _resolve_dtype(dtype):
    """None, a floating torch dtype, or its name ("bfloat16", "torch.float16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"dtype must be a floating-point torch dtype or None, got {dtype!r}")
    return dtype


def _close_handles(handles: dict) -> None:
    for handle in handles.values():
        handle.__exit__(None, None, None)
    handles.clear()


def load_checkpoint(path, config: ModelConfig, device="cpu", dtype=None, progress=None,
                    shard=None) -> dict[str, torch.Tensor]:
    """Read a checkpoint directory into the fused runtime layout (`layout.fused_tensor_shapes(config)`).

    `dtype=None` keeps the stored dtype, otherwise floating tensors are cast. With a `quantization_config` in
    config.json (GPTQ v1/v2, AWQ GEMM), the language model's linears stored quantized come back as
    `quant.QuantizedWeight` (q/k/v and gate/up fused along N; `quant.QuantizedParts` where their act-order
    permutations differ); everything else stays floating. Tied models get `lm_head.weight`
    as the very `model.embed_tokens.weight` tensor (a stored `lm_head.weight` is ignored). `progress`: True /
    False, or None for a bar on stderr only above 1 GiB. Raises `CheckpointError` on any mismatch.
    MLP widths stay the checkpoint's here; `model.load` then zero-pads unaligned ones (align.pad_mlp_widths).
    `shard`: a `parallel.TensorParallel`; each tensor is then read as this rank's slice only (the checks above
    still run on the whole checkpoint's headers).
    """
    path = os.path.abspath(os.fspath(path))
    dtype = _resolve_dtype(dtype)
    tied = config.text.tie_word_embeddings
    weight_map, headers = _scan(path)
    entries: dict[str, tuple] = {}  # canonical hub name -> (file, header entry, stored name)
    for stored, file in weight_map.items():
        name = layout.canonical_hub_name(stored)
        if tied and name.startswith("lm_head."):
            continue  # the hub's tied checkpoints may store a copy; the runtime shares embed_tokens instead
        if name in entries:
            raise CheckpointError(f"tensor {name} is stored twice: as {entries[name][2]} in {entries[name][0]} "
                                  f"and as {stored} in {file} (mixed key schemes?)")
        entries[name] = (file, headers[file][stored], stored)
    qcfg = QuantConfig.from_config(config.raw) if config.raw else None
    qprefixes, qnames = _split_quantized(entries, config, qcfg) if qcfg is not None else (set(), set())
    if qcfg is not None and not qprefixes:
        warnings.warn(f"{path}: config.json has a {qcfg.method.upper()} quantization_config but every weight is "
                      "stored floating point; loading the model unquantized", stacklevel=2)
    checked = {n: e[:2] for n, e in entries.items() if n not in qnames}
    known = layout.hub_tensor_shapes(config, include_lm_head=True)
    for p in qprefixes:  # shapes of the packed tensors are checked by quant.formats when they are read
        checked[p + ".weight"] = (entries[p + ".qweight"][0], {"shape": list(known[p + ".weight"]), "dtype": "F16"})
    _check(checked, config)

    plan = layout.fusion_plan(config)
    hub_name = {fused: hub for hub, fused in layout.RENAMES.items()}
    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for _, info, _ in entries.values())
    show = progress if progress is not None else sum(map(os.path.getsize, headers)) > PROGRESS_MIN_BYTES
    from tqdm import tqdm  # only needed here; keeps `import qwen2vl_fast` light

    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack, tqdm(total=total, unit="B", unit_scale=True, desc="loading checkpoint",
                                    file=sys.stderr, disable=not show) as bar:
        handles: dict[str, object] = {}
        if shard is not None:  # sharded: the memory maps are closed after every group (below), or on an error
            stack.callback(_close_handles, handles)

        def read(name: str, spec=_OWN_SLICE) -> torch.Tensor:
            file, info, stored = entries[name]
            try:
                if file not in handles:  # shards stay open: a fusion group may span two of them
                    if shard is None:
                        handles[file] = stack.enter_context(safe_open(file, framework="pt", device=str(device)))
                    else:  # slices are cut on the host (a device handle may read whole tensors), then moved
                        handles[file] = safe_open(file, framework="pt", device="cpu").__enter__()
                if shard is None:
                    t = handles[file].get_tensor(stored)
                else:  # this rank's slice only (spec: see parallel.TensorParallel.read_slice)
                    spec = shard.float_spec(name) if spec is _OWN_SLICE else spec
                    t = shard.read_slice(handles[file], stored, spec, info["shape"]).to(device)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {stored} ({e})") from None
            bar.update(info["data_offsets"][1] - info["data_offsets"][0])
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        for fused in layout.fused_tensor_shapes(config):  # the runtime's order; embed_tokens precedes lm_head
            if shard is not None:
                # the pages of the previous group's slices stay mapped (and counted in the process's memory)
                # while its files are open: a rank's load then peaks near its shard plus one group
                _close_handles(handles)
            if tied and fused == "lm_head.weight":
                out[fused] = out["model.embed_tokens.weight"]
                continue
            parts = plan.get(fused, (hub_name.get(fused, fused),))
            quantized = [p.endswith(".weight") and p[: -len(".weight")] in qprefixes for p in parts]
            if any(quantized):
                if not all(quantized):
                    raise CheckpointError(f"{fused}: its parts {', '.join(parts)} must be all quantized or all "
                                          "floating to be fused")
                qws = []
                for p in parts:
                    prefix = p[: -len(".weight")]
                    names = [n for n in (f"{prefix}.{s}" for s in _QUANT_SUFFIXES) if n in entries]
                    if shard is None:
                        stored = {n: read(n) for n in names}
                    else:
                        stored = shard.read_quantized(read, prefix, {n: entries[n][1]["shape"] for n in names})
                    qws.append(load_quantized_linear(stored, prefix, qcfg, dtype=dtype))
                # a QuantizedWeight (N along qweight's dim 1), or QuantizedParts where act-order permutations differ
                out[fused] = fuse_quantized(qws, fused)
                continue
            tensors = [read(p) for p in parts]
            if len(tensors) > 1:
                t = torch.cat(tensors, dim=0)
            elif parts[0] == "visual.patch_embed.proj.weight":  # Conv3d -> GEMM weight (E, C*t*p*p)
                t = tensors[0].contiguous().reshape(tensors[0].shape[0], -1)
            else:
                t = tensors[0]
            del tensors  # free the parts before reading the next group
            out[fused] = t
    return out
