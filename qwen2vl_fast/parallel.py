"""Tensor parallelism of the language model over a torch.distributed process group (Megatron-style).

    torchrun --nproc-per-node 2 app.py        # in app.py:
    torch.distributed.init_process_group("nccl")                      # "gloo" on CPUs
    model = qwen2vl_fast.load(path, device="cuda", dtype="bfloat16", tensor_parallel=True)
    engine = Engine.from_pretrained(path, device="cuda", tensor_parallel=True)

`tensor_parallel=True` shards over the default group (`torch.distributed.group.WORLD`); a `ProcessGroup` may be
passed instead. Every rank runs the same calls with the same inputs and gets the same, full logits.

How the decoder is split over N ranks (rank r):

    qkv_proj     column-parallel by heads: rank r holds query heads [r*Hq/N, (r+1)*Hq/N) and the KV heads they
                 read. With N <= Hkv those are KV heads [r*Hkv/N, (r+1)*Hkv/N); with N > Hkv each rank holds the
                 one KV head r*Hkv//N, replicated on the N/Hkv ranks that share it (vLLM's rule). Needs Hq % N == 0
                 and Hkv % N == 0 or N % Hkv == 0, checked before anything is read, with the same clear error on
                 every rank (nothing collective has run yet, so no rank waits on another).
    attention    local: the KV cache of a rank holds only its KV heads (the rank's config says so, see
                 `RankTextConfig`, and `KVCache.allocate` follows it)
    o_proj       row-parallel (input columns of the rank's heads), then one all-reduce (sum)
    gate_up_proj column-parallel: rank r holds gate rows and up rows [r*I_r, (r+1)*I_r)
    down_proj    row-parallel (input columns [r*I_r, (r+1)*I_r)), then one all-reduce
    embed_tokens vocab-parallel: rank r holds rows [r*V_r, (r+1)*V_r); ids outside are looked up as 0 and
                 masked to zero, then one all-reduce (exactly one rank contributes each row: the sum is exact)
    lm_head      vocab-parallel (the same rows; a tied head is the same tensor), then one all-gather, cut to V:
                 every rank returns the full logits, bit-identical across ranks (greedy and seeded sampling
                 then agree everywhere)
    norms        replicated (the residual stream is replicated: every rank holds the full hidden state)

Widths that N does not divide are padded with zeros, which is exact: the MLP's intermediate width to
N * I_r (zero gate/up rows give silu(0) * 0 = 0, zero down columns add nothing), the vocabulary to N * V_r
(zero rows embed nothing and their logits are cut off after the gather). Query heads are never padded: a rank
count that does not divide them (or more ranks than heads) is refused.

Quantized checkpoints (GPTQ/AWQ): column-parallel linears split along N (a multiple of the values packed per
word; act-order g_idx and the groups along K are kept whole). Row-parallel ones (o_proj, down_proj) split along
K on group boundaries: I_r is a whole number of groups, so the 72B's 29568 = 231 groups of 128 is padded to 232
groups (29696, Qwen's own padding) at 2, 4 and 8 ranks, with zero qweight rows and zero scales, and its o_proj
share (8192 / N columns) is whole groups. Where a row split cannot fall on groups (`TensorParallel._row_mode`):
- act-order (desc_act) g_idx whose groups scatter over the ranks' input slices, or an o_proj share narrower
  than a group: rank r takes whole groups [r*G_r, (r+1)*G_r) in group order (the input rows that hold them, the
  last rank's zero-padded) and gathers the whole input from the ranks before the GEMM, picking those columns
  (`GatheredInput`): one all-gather more per such linear, no refusal; the packed qweight of such a linear is read
  whole (its rows are scattered), one linear at a time;
- act-order whose every rank's slice happens to hold whole groups: those groups, renumbered, no gather.
Every rank takes the same decision from the whole g_idx, so the collectives pair up.

The vision tower is replicated on every rank, not split: it is about 0.7 B parameters (1.3 GB bf16) next to the
72B decoder's 70 B, it runs once per image at prefill, and replicating it costs no communication and keeps the
vision path unchanged; each rank computes the same features from the same pixels. (Splitting images across
ranks is a possible later gain for image-heavy prefill.)

Loading: each rank reads only its own slices from the safetensors files (`safe_open(...).get_slice`), one fusion
group at a time, so no rank ever holds the whole model; `TensorParallel.bytes_read` counts what it read. After
the load every rank takes part in one small all-reduce saying whether its load succeeded, so a rank that failed
(missing file, out of memory) makes every rank raise instead of leaving the others waiting in a collective.

The collectives are plain `torch.distributed` calls on the current stream, with no host synchronisation, so the
decode step stays CUDA-graph capturable: under NCCL (which supports stream capture) the all-reduces and the
all-gathers are recorded into the engine's decode graphs like any kernel; the communicator is created eagerly
by the load's closing all-reduce, before any capture. Dispatch note: each rank measures its own kernel choices (dispatch="measure"); the
results stay identical across ranks because the logits are gathered, but for identical numerics on every rank
pass dispatch="cached" or "default".
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ModelConfig, TextConfig
from .errors import ConfigError


class TensorParallelError(ConfigError):
    """The model cannot be sharded over this many ranks, or the process group is unusable for it."""


@dataclass(frozen=True)
class RankTextConfig(TextConfig):
    """One rank's share of the decoder: heads, KV heads and MLP width are the rank's own (what its weights and
    its KV cache hold); head_dim and everything else stay the model's."""

    tp_rank: int = 0
    tp_size: int = 1
    full_num_attention_heads: int = 0
    full_num_key_value_heads: int = 0
    full_intermediate_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.full_num_attention_heads


@dataclass
class GatheredInput:
    """A row-parallel quantized linear over whole groups of scattered input rows (`TensorParallel._read_gathered`):
    its input is gathered from every rank and `index` picks the weight's rows' columns; the output is a partial
    sum, all-reduced like any row-parallel linear."""

    weight: object
    index: torch.Tensor
    tp: "TensorParallel"

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_last(x).index_select(-1, self.index)


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _working_counts(cfg: ModelConfig, qcfg, limit: int = 64) -> list:
    works = []
    for n in range(1, limit + 1):
        try:
            _check_shardable(cfg, n, qcfg)
            works.append(n)
        except TensorParallelError:
            pass
    return works


def _check_shardable(cfg: ModelConfig, n: int, qcfg) -> None:
    """Raises TensorParallelError when n ranks cannot split the model. Quantized checkpoints (`qcfg`) add no
    condition: row splits off their groups are read another way (`TensorParallel._row_mode`)."""
    t = cfg.text
    hq, hkv = t.num_attention_heads, t.num_key_value_heads
    if n > hq:
        raise TensorParallelError(f"{n} ranks exceed the {hq} query heads: each rank needs at least one head")
    if hq % n:
        raise TensorParallelError(f"{hq} query heads do not split evenly over {n} ranks")
    if hkv % n and n % hkv:
        raise TensorParallelError(f"{hkv} KV heads can be neither split over {n} ranks nor replicated evenly on "
                                  f"them (needs {hkv} % ranks == 0 or ranks % {hkv} == 0)")


@dataclass
class TensorParallel:
    """One rank's view of the sharding: sizes, the slices it reads, and the collectives."""

    rank: int
    size: int
    cfg: ModelConfig          # the whole model's config
    group: object = None      # the torch.distributed ProcessGroup (None: the default group)
    qcfg: object = None       # the checkpoint's QuantConfig, or None
    bytes_read: int = 0       # bytes this rank read from the checkpoint files
    gathered: dict = dataclasses.field(default_factory=dict)  # hub prefix -> input columns (`_read_gathered`)

    def __post_init__(self):
        t, n = self.cfg.text, self.size
        _check_shardable(self.cfg, n, self.qcfg)
        d = t.head_dim
        self.q_heads = t.num_attention_heads // n
        if n <= t.num_key_value_heads:
            self.kv_heads = t.num_key_value_heads // n
            self.kv_start = self.rank * self.kv_heads
        else:
            self.kv_heads, self.kv_start = 1, self.rank * t.num_key_value_heads // n
        self.head_dim = d
        # MLP width per rank: whole quantization groups when down_proj is quantized (row-parallel along K), a
        # multiple of the packing when gate/up are (column-parallel along N: packed zeros / AWQ words)
        quantum = 1
        q = self.qcfg
        if q is not None and not q.skips("mlp.down_proj") and q.group_size > 0:
            quantum = q.group_size
        if q is not None and not (q.skips("mlp.gate_proj") and q.skips("mlp.up_proj")):
            quantum = math.lcm(quantum, 32 // q.bits)
        self.inter = _ceil_to(-(-t.intermediate_size // n), quantum)
        vq = 32 // q.bits if (q is not None and (q.lm_head or not t.tie_word_embeddings)) else 1
        self.vocab = _ceil_to(-(-t.vocab_size // n), vq)

    # -- shapes --------------------------------------------------------------------------------------------

    @property
    def padded_intermediate(self) -> int:
        return self.inter * self.size

    def local_config(self, cfg: Optional[ModelConfig] = None) -> ModelConfig:
        """The rank's ModelConfig: its text config holds the rank's heads, KV heads and MLP width (the KV cache
        and the attention read them); vocab, hidden size, head_dim and the vision config are the model's."""
        cfg = cfg or self.cfg
        fields = {f.name: getattr(cfg.text, f.name) for f in dataclasses.fields(TextConfig)}
        fields.update(num_attention_heads=self.q_heads, num_key_value_heads=self.kv_heads,
                      intermediate_size=self.inter)
        text = RankTextConfig(**fields, tp_rank=self.rank, tp_size=self.size,
                              full_num_attention_heads=cfg.text.num_attention_heads,
                              full_num_key_value_heads=cfg.text.num_key_value_heads,
                              full_intermediate_size=cfg.text.intermediate_size)
        return cfg.replace(text=text)

    def linear_split(self, prefix: str):
        """How the linear `prefix` (hub naming, no `.weight`) is split: ("col", start, stop) over its outputs,
        ("row", start, stop) over its inputs, or None (replicated). stop may pass the true width: zero padding."""
        r, d = self.rank, self.head_dim
        if prefix in ("model.embed_tokens", "lm_head"):
            return ("col", r * self.vocab, (r + 1) * self.vocab)
        if not prefix.startswith("model.layers."):
            return None
        module = prefix.split(".", 3)[3]
        if module == "self_attn.q_proj":
            return ("col", r * self.q_heads * d, (r + 1) * self.q_heads * d)
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            return ("col", self.kv_start * d, (self.kv_start + self.kv_heads) * d)
        if module == "self_attn.o_proj":
            return ("row", r * self.q_heads * d, (r + 1) * self.q_heads * d)
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            return ("col", r * self.inter, (r + 1) * self.inter)
        if module == "mlp.down_proj":
            return ("row", r * self.inter, (r + 1) * self.inter)
        return None

    # -- reading -------------------------------------------------------------------------------------------

    def float_spec(self, name: str):
        """(dim, start, stop) of the hub float tensor `name` this rank reads, or None for the whole tensor."""
        for kind in (".weight", ".bias"):
            if name.endswith(kind):
                split = self.linear_split(name[: -len(kind)])
                break
        else:
            return None
        if split is None:
            return None
        how, a, b = split
        if how == "col":
            return (0, a, b)
        return (1, a, b) if kind == ".weight" else None  # a row-parallel bias would be added once: none exist

    def read_slice(self, handle, stored: str, spec, shape) -> torch.Tensor:
        """The slice `spec` = (dim, start, stop) of a stored tensor of `shape`, zero-padded past its end; the
        whole tensor for None. Only the slice's bytes are read."""
        if spec is None:
            t = handle.get_tensor(stored)
        else:
            dim, a, b = spec
            size = shape[dim]
            end = min(b, size)
            index = [slice(None)] * len(shape)
            index[dim] = slice(min(a, size), end)
            # safetensors returns a view of the whole tensor's memory map (only the slice's pages are read):
            # copy it out so that the map is released and the rank holds its slice alone
            t = handle.get_slice(stored)[tuple(index)].clone(memory_format=torch.contiguous_format)
            if end - a < b - a:  # zero padding past the end (the last rank's share of a padded width)
                pad_shape = list(t.shape)
                pad_shape[dim] = (b - a) - max(end - a, 0)
                t = torch.cat([t, t.new_zeros(pad_shape)], dim)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_quantized(self, read: Callable, prefix: str, shapes: dict) -> dict:
        """This rank's {`prefix`.qweight/qzeros/scales[/g_idx]} of a quantized linear in its stored format.
        read(name, spec) reads a stored tensor's slice (see `read_slice`); shapes: name -> stored shape."""
        from .quant.config import AWQ

        q = self.qcfg
        split = self.linear_split(prefix)
        names = {s: f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{s}" in shapes}
        if split is None:
            return {n: read(n, None) for n in names.values()}
        how, a, b = split
        pack, gs, awq = 32 // q.bits, q.group_size, q.method == AWQ
        if how == "col":  # along N: qweight (GPTQ: dim 1 unpacked; AWQ: dim 1 packed), qzeros dim 1 packed
            if a % pack or b % pack:
                raise TensorParallelError(f"{prefix}: its output split [{a}, {b}) per rank is not a multiple "
                                          f"of the {pack} values packed in a {q.method.upper()} word")
            specs = {"qweight": (1, a // pack, b // pack) if awq else (1, a, b), "qzeros": (1, a // pack, b // pack),
                     "scales": (1, a, b), "g_idx": None}
            return {n: read(n, specs[s]) for s, n in names.items()}
        # along K: qweight (GPTQ: dim 0 packed; AWQ: dim 0 unpacked), qzeros/scales by group, g_idx by row
        k = shapes[names["qweight"]][0] * (1 if awq else pack)
        g_idx = read(names["g_idx"], None) if "g_idx" in names else None  # whole: every rank decides alike
        g = None if g_idx is None else g_idx.to(torch.int64)
        mode = self._row_mode(k, gs, pack, b - a, g)
        if mode == "gathered":
            return self._read_gathered(read, prefix, names, k, gs, awq, pack, g, g_idx)
        out = {names["qweight"]: read(names["qweight"], (0, a, b) if awq else (0, a // pack, b // pack))}
        if mode == "contiguous":  # groups in input order: the rank's groups are [a/gs, b/gs) (zero-padded)
            for s in ("qzeros", "scales"):
                out[names[s]] = read(names[s], (0, a // gs, b // gs) if gs > 0 else None)  # -1: one group, kept
            if g_idx is not None:
                rows = torch.arange(a, b, dtype=torch.int64)
                out[names["g_idx"]] = ((rows - a) // gs if gs > 0 else rows * 0).to(g_idx.dtype)
            return out
        # act-order whose every rank's slice holds whole groups: those groups, renumbered in their order
        groups = torch.unique(g[a:b])
        for s in ("qzeros", "scales"):
            full = read(names[s], None)
            out[names[s]] = full.index_select(0, groups.to(full.device)).contiguous()
        out[names["g_idx"]] = torch.searchsorted(groups, g[a:b]).to(g_idx.dtype)
        return out

    def _row_mode(self, k: int, gs: int, pack: int, width: int, g) -> str:
        """How a quantized linear split along K is read, the same on every rank: "contiguous" (groups in input
        order, the rank's slice is whole groups, zero-padded past K), "regrouped" (act-order, every rank's input
        slice happens to hold whole groups), or "gathered" (neither: see `_read_gathered`)."""
        if gs <= 0:
            return "contiguous"
        trivial = g is None or torch.equal(g, torch.arange(k) // gs)
        if width % gs == 0 and width % pack == 0 and trivial:
            return "contiguous"
        if not trivial and width * self.size == k:
            for r in range(self.size):
                if not bool((torch.unique(g[r * width:(r + 1) * width], return_counts=True)[1] == gs).all()):
                    return "gathered"
            return "regrouped"
        return "gathered"

    def _read_gathered(self, read, prefix, names, k, gs, awq, pack, g, g_idx) -> dict:
        """A row-parallel split that does not fall on groups (act-order g_idx scattering groups over the ranks'
        input slices, or an o_proj share narrower than a group): rank r takes whole groups [r*G_r, (r+1)*G_r) in
        group order (zero-padded), i.e. the input rows perm[...] that hold them, and at run time gathers the
        whole input from the ranks and picks those columns (`GatheredInput`): one all-gather more per such
        linear. The packed qweight is read whole (its rows are scattered), one linear at a time."""
        from .quant.weight import pack_int32, unpack_int32

        groups = k // gs
        per = -(-groups // self.size)
        a, b = self.rank * per * gs, (self.rank + 1) * per * gs  # rows in group order
        perm = torch.argsort(g, stable=True) if g is not None else torch.arange(k)
        rows = perm[a:min(b, k)]
        pad = (b - a) - rows.numel()
        packed = read(names["qweight"], None)
        if awq:  # (K, N/8): rows are the input rows
            picked = packed.index_select(0, rows.to(packed.device))
            picked = torch.cat([picked, picked.new_zeros((pad, picked.shape[1]))])
        else:
            vals = unpack_int32(packed, 32 // pack).index_select(0, rows.to(packed.device))
            picked = pack_int32(torch.cat([vals, vals.new_zeros((pad, vals.shape[1]))]), 32 // pack)
        out = {names["qweight"]: picked.contiguous()}
        for s in ("qzeros", "scales"):
            out[names[s]] = read(names[s], (0, a // gs, b // gs))
        if g_idx is not None:
            out[names["g_idx"]] = (torch.arange(b - a) // gs).to(g_idx.dtype)
        self.gathered[prefix] = torch.cat([rows, rows.new_zeros(pad)])  # padded rows: zero weights, any column
        return out

    def wrap_gathered(self, weights: dict, device) -> dict:
        """Wrap the linears read by `_read_gathered` as GatheredInput (in place); returns `weights`."""
        for prefix, index in self.gathered.items():
            weights[prefix + ".weight"] = GatheredInput(weights[prefix + ".weight"], index.to(device), self)
        return weights

    # -- collectives ---------------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, ops, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: this rank's rows, zeros elsewhere, summed over the ranks."""
        local = input_ids - self.rank * self.vocab
        inside = (local >= 0) & (local < self.vocab)
        out = ops.embedding(torch.where(inside, local, torch.zeros_like(local)), table)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.all_reduce(out)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., W) per rank -> (..., N * W) on every rank: the ranks' blocks side by side, in rank order."""
        import torch.distributed as dist

        lead, w = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, w).contiguous()
        out = flat.new_empty((self.size * flat.shape[0], w))  # the ranks' blocks one after another
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.view(self.size, flat.shape[0], w).permute(1, 0, 2).reshape(*lead, self.size * w)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """(..., V_r) per rank -> (..., V) on every rank."""
        return self.gather_last(local)[..., : self.cfg.text.vocab_size]


def process_group(tensor_parallel):
    """(group, rank, size) for `tensor_parallel` = True (the default group) or a ProcessGroup; raises
    TensorParallelError without any collective when torch.distributed is not ready."""
    import torch.distributed as dist

    if not dist.is_available():
        raise TensorParallelError("tensor_parallel needs torch.distributed, which this torch build lacks")
    if not (tensor_parallel is True or isinstance(tensor_parallel, dist.ProcessGroup)):
        raise TensorParallelError(f"tensor_parallel={tensor_parallel!r}: pass True (the default process group), "
                                  "a torch.distributed ProcessGroup, or False")
    if not dist.is_initialized():
        raise TensorParallelError(
            "tensor_parallel=True needs an initialised torch.distributed process group: run under torchrun "
            "(torchrun --nproc-per-node N ...) and call torch.distributed.init_process_group('nccl' on GPUs, "
            "'gloo' on CPUs) first, or use `qwen2vl-fast generate --tensor-parallel`, which does it")
    group = None if tensor_parallel is True else tensor_parallel
    return group, dist.get_rank(group), dist.get_world_size(group)


def setup(tensor_parallel, cfg: ModelConfig, device: torch.device) -> Optional[TensorParallel]:
    """The rank's TensorParallel for `load(..., tensor_parallel=...)`: None when off (False/None) or when the group
    has one rank. True: the default process group, which must be initialised; or a ProcessGroup. The checks are
    the same on every rank and run no collective: a model that cannot be sharded fails everywhere at once."""
    if tensor_parallel is None or tensor_parallel is False:
        return None
    import torch.distributed as dist

    group, rank, size = process_group(tensor_parallel)
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cpu" and backend == "nccl":
        raise TensorParallelError("the process group uses NCCL, which runs on GPUs only: load with device='cuda' "
                                  "or initialise the group with backend='gloo' for the CPU")
    from .quant.config import QuantConfig

    qcfg = QuantConfig.from_config(cfg.raw) if cfg.raw else None
    if size == 1:
        return None
    try:
        return TensorParallel(rank, size, cfg, group, qcfg)
    except TensorParallelError as e:
        works = [n for n in _working_counts(cfg, qcfg) if n > 1]
        hint = (f"; rank counts that shard this model: {', '.join(map(str, works))}" if works
                else "; no rank count above 1 shards this model")
        raise TensorParallelError(f"cannot shard {cfg.model_type} over {size} ranks (this is rank {rank}): {e}"
                                  f"{hint}") from None


def init_from_env(device) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
    environment), NCCL for a CUDA device, gloo otherwise, unless one is initialised already; (rank, size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise TensorParallelError(f"--tensor-parallel runs under torchrun (e.g. torchrun --nproc-per-node 2 "
                                      f"$(which qwen2vl-fast) generate --tensor-parallel ...): {', '.join(missing)} "
                                      "not set")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: torch.device, tp: Optional[TensorParallel]) -> torch.device:
    """`cuda` without an index under tensor parallelism means this rank's GPU: LOCAL_RANK (torchrun), else
    the rank modulo the visible GPUs; it is made the current device (NCCL uses it)."""
    if tp is None or device.type != "cuda" or device.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", str(tp.rank % max(1, torch.cuda.device_count()))))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


def weight_bytes(weights: dict) -> int:
    """Bytes of a weights dict's tensors (quantized weights' parts included), each storage counted once (a
    tied head shares the embedding's)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None:
            return
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
            return
        if isinstance(t, GatheredInput):
            add(t.weight)
            add(t.index)
            return
        if hasattr(t, "parts"):
            for p in t.parts:
                add(p)
            return
        for f in ("qweight", "scales", "zeros", "perm"):
            add(getattr(t, f, None))

    for w in weights.values():
        add(w)
    return total


def agree(group, ok: bool) -> bool:
    """Whether every rank of `group` says ok: one all-reduce of a flag (on the current GPU under NCCL)."""
    import torch.distributed as dist

    nccl = str(dist.get_backend(group)).lower() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, group=group)
    return int(flag.item()) == 0


def fail_together(group, ok: bool, what: str = "load") -> None:
    """Called by every rank after a step that may fail on some: raises on the ranks that succeeded when another
    failed (a failed rank calls it with ok=False and then raises its own error), so none waits forever."""
    import torch.distributed as dist

    if not agree(group, ok) and ok:
        raise TensorParallelError(f"tensor-parallel {what} failed on another rank (see its error); rank "
                                  f"{dist.get_rank(group)} stops too")


__all__ = ["TensorParallel", "TensorParallelError", "RankTextConfig", "process_group", "setup", "rank_device",
           "weight_bytes", "agree", "fail_together"]
