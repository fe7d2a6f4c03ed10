"""The LLM's M-RoPE in Triton: rotary fused with the KV-cache write, and the cache-less rotary and tables.

    rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions)       (ops.decoding.rope_kv_write)
        q (T, Hq, D), k / v (T, Hkv, D): strided views of one qkv projection output; cos, sin (T, D) in q's dtype;
        caches (max_batch, max_len, Hkv, D); slots, positions (T,) int.
        q and k are rotated IN PLACE (x * cos + rotate_half(x) * sin), the rotated k and v are written to
        k_cache / v_cache[slots[t], positions[t]]; returns (q, k), the rotated inputs themselves.
    mrope_kv_write(q, k, v, position_ids, inv_freq, section, k_cache, v_cache, slots, positions)
        the same, with cos/sin made on the fly from position_ids (3, T) and inv_freq (D/2,) fp32: no (T, D)
        tables in memory, one launch instead of the tables' chain of small kernels.
    apply_rotary(q, k, cos, sin)                                                (ops.rotary.apply_rotary)
        q (B, L, Hq, D), k (B, L, Hkv, D), cos/sin (B, L, D) -> new rotated q, k (contiguous); inputs untouched.
    mrope_cos_sin(position_ids, inv_freq, section, dtype)                       (ops.rotary.mrope_cos_sin)
        position_ids (3, B, L) -> cos, sin (B, L, D) in dtype.

Numerics (REFERENCE.md §3), bit-identical to the references in every dtype:
- angle_j = float(pos[axis(j)]) * inv_freq[j] in fp32 (axis 0 = T for j < s0, 1 = H for j < s0 + s1, else W;
  dim j + D/2 repeats frequency j); cos, sin in fp32, then ROUNDED to the model dtype;
- the rotation runs "in the model dtype" as torch does it: each product and the sum are separate ops rounded
  to the dtype, i.e. out = rnd(rnd(x * c) + rnd(rotate_half(x) * s)). The kernel computes in fp32 with explicit
  rounding casts: a product of two fp16/bf16 values is exact in fp32 and torch's 16-bit add is an fp32 add
  rounded once, so the same casts reproduce it bit for bit (on sm_90 LLVM narrows them to mul.rn.bf16 /
  add.rn.bf16, which round identically). enable_fp_fusion=False is essential in every dtype: with it on, the
  product and the add fuse into fma.rn.{f32,bf16,f16}, one rounding fewer than torch (checked in the sm_90 test).
- tl.cos / tl.sin compile to libdevice's __nv_cosf / __nv_sinf (full range reduction, not the .approx
  instructions; checked in the sm_90 test), as torch's CUDA cos/sin do; their Payne-Hanek path for huge angles
  keeps a small local array, so ptxas reports a 32-byte stack frame (no spill) for the kernels that evaluate them
  (kernels/aot_sweep.py). Under the interpreter they are numpy's float32 cos/sin, which differ from torch's CPU
  (SLEEF) ones by 1 fp32 ulp on ~15% of angles: there the fused tables can differ from mrope_cos_sin's by one ulp
  of the model dtype (tests/test_kernels_mrope.py).

Launch: one program per token. A token's q heads form one (next_pow2(Hq), next_pow2(D/2)) tile of first halves
and one of second halves, likewise k and v; cos/sin (loaded or computed) are shared by all its heads. The kernel
is memory-bound: q and k read and written once, v read once, k and v written once to the cache. Rows whose slot
or position is out of the cache's range are not written (memory safety; the engine never sends them, and a
device-side check needs no host sync).
"""

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Compile flags of every kernel here. enable_fp_fusion=False: no FMA contraction, so x*c + y*s rounds like
# torch's separate ops in every dtype (see the header). enable_reflect_ftz=False: libdevice's cosf/sinf without
# flush-to-zero, as nvcc compiles torch's (Triton's default flushes subnormals inside libdevice).
_FLAGS = dict(enable_fp_fusion=False, enable_reflect_ftz=False)


@triton.jit
def _angles(p_t, p_h, p_w, inv_freq, j, S0: tl.constexpr, S01: tl.constexpr):
    """fp32 angles pos[axis(j)] * inv_freq[j]: the T position for j < S0, H for j < S01, W above (contiguous
    M-RoPE sections). p_t / p_h / p_w: integer scalars or columns, broadcast against j."""
    pos = tl.where(j < S0, p_t, tl.where(j < S01, p_h, p_w))
    return pos.to(tl.float32) * inv_freq


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """First / second halves of x*cos + rotate_half(x)*sin with rotate_half(x) = (-x2, x1), rounded after each
    product and after the sum as torch's ops in x's dtype are (c*, s*: fp32 holding values of that dtype)."""
    q_dtype = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a * c1).to(q_dtype).to(tl.float32) - (b * s1).to(q_dtype).to(tl.float32)
    o2 = (b * c2).to(q_dtype).to(tl.float32) + (a * s2).to(q_dtype).to(tl.float32)
    return o1.to(q_dtype), o2.to(q_dtype)


@triton.jit
def _rope_kernel(Q, q_st, q_sh, K, k_st, k_sh, V, v_st, v_sh,
                 QO, qo_st, qo_sh, KO, ko_st, ko_sh,
                 COS, cos_st, SIN, sin_st,
                 POS_IDS, pos_sa, pos_st, INV_FREQ,
                 K_CACHE, kc_sb, kc_sl, kc_sh, V_CACHE, vc_sb, vc_sl, vc_sh,
                 SLOTS, slots_st, POSITIONS, positions_st, max_batch, max_len,
                 NUM_Q_HEADS, NUM_KV_HEADS,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 FUSED: tl.constexpr, S0: tl.constexpr, S01: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """Rotate the q and k heads of token program_id(0) into QO / KO (== Q / K for in place); with WRITE_CACHE
    also store rotated k and v at the cache row [SLOTS[t], POSITIONS[t]]. FUSED: cos/sin from POS_IDS (3, T)
    and INV_FREQ, else from the COS / SIN tables (T, D) in q's dtype."""
    tok = tl.program_id(0).to(tl.int64)  # tok * stride overflows int32 on long prompts
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    hq = tl.arange(0, BLOCK_HQ)
    hk = tl.arange(0, BLOCK_HKV)
    q_mask = (hq < NUM_Q_HEADS)[:, None] & j_mask[None, :]
    k_mask = (hk < NUM_KV_HEADS)[:, None] & j_mask[None, :]

    pq = Q + tok * q_st + hq[:, None] * q_sh + j[None, :]
    q1 = tl.load(pq, mask=q_mask, other=0.0)
    q2 = tl.load(pq + HALF, mask=q_mask, other=0.0)

    if FUSED:
        pos = POS_IDS + tok * pos_st
        ang = _angles(tl.load(pos), tl.load(pos + pos_sa), tl.load(pos + 2 * pos_sa),
                      tl.load(INV_FREQ + j, mask=j_mask, other=0.0), j, S0, S01)
        c1 = tl.cos(ang).to(q1.dtype).to(tl.float32)[None, :]
        s1 = tl.sin(ang).to(q1.dtype).to(tl.float32)[None, :]
        c2, s2 = c1, s1
    else:
        c1 = tl.load(COS + tok * cos_st + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + tok * cos_st + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + tok * sin_st + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + tok * sin_st + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]

    o1, o2 = _rotate(q1, q2, c1, c2, s1, s2)
    po = QO + tok * qo_st + hq[:, None] * qo_sh + j[None, :]
    tl.store(po, o1, mask=q_mask)
    tl.store(po + HALF, o2, mask=q_mask)

    pk = K + tok * k_st + hk[:, None] * k_sh + j[None, :]
    k1, k2 = _rotate(tl.load(pk, mask=k_mask, other=0.0), tl.load(pk + HALF, mask=k_mask, other=0.0),
                     c1, c2, s1, s2)
    po = KO + tok * ko_st + hk[:, None] * ko_sh + j[None, :]
    tl.store(po, k1, mask=k_mask)
    tl.store(po + HALF, k2, mask=k_mask)

    if WRITE_CACHE:
        slot = tl.load(SLOTS + tok * slots_st).to(tl.int64)
        at = tl.load(POSITIONS + tok * positions_st).to(tl.int64)
        w_mask = k_mask & ((slot >= 0) & (slot < max_batch) & (at >= 0) & (at < max_len))
        pc = K_CACHE + slot * kc_sb + at * kc_sl + hk[:, None] * kc_sh + j[None, :]
        tl.store(pc, k1, mask=w_mask)
        tl.store(pc + HALF, k2, mask=w_mask)
        pv = V + tok * v_st + hk[:, None] * v_sh + j[None, :]
        pc = V_CACHE + slot * vc_sb + at * vc_sl + hk[:, None] * vc_sh + j[None, :]
        tl.store(pc, tl.load(pv, mask=w_mask, other=0.0), mask=w_mask)
        tl.store(pc + HALF, tl.load(pv + HALF, mask=w_mask, other=0.0), mask=w_mask)


@triton.jit
def _cos_sin_kernel(POS_IDS, pos_sa, pos_st, INV_FREQ, COS, SIN, n_tok,
                    HALF: tl.constexpr, S0: tl.constexpr, S01: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """COS / SIN (n_tok, 2*HALF), contiguous, in their dtype, for the BLOCK_T tokens of program_id(0)."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_HALF)
    t_mask = tok < n_tok
    mask = t_mask[:, None] & (j < HALF)[None, :]
    pos = POS_IDS + tok * pos_st
    ang = _angles(tl.load(pos, mask=t_mask, other=0)[:, None], tl.load(pos + pos_sa, mask=t_mask, other=0)[:, None],
                  tl.load(pos + 2 * pos_sa, mask=t_mask, other=0)[:, None],
                  tl.load(INV_FREQ + j, mask=j < HALF, other=0.0)[None, :], j[None, :], S0, S01)
    off = tok[:, None] * (2 * HALF) + j[None, :]
    c = tl.cos(ang).to(COS.dtype.element_ty)
    s = tl.sin(ang).to(SIN.dtype.element_ty)
    tl.store(COS + off, c, mask=mask)
    tl.store(COS + off + HALF, c, mask=mask)
    tl.store(SIN + off, s, mask=mask)
    tl.store(SIN + off + HALF, s, mask=mask)


# --------------------------------------------------------------------------------------------------- checks

def _check_float(name: str, t: torch.Tensor, dims: int, dtype=None, device=None) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES or (dtype is not None and t.dtype != dtype):
        want = dtype if dtype is not None else "float32, float16 or bfloat16"
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, strides {t.stride()}")


def _check_qkv(q, k, v) -> tuple[int, int, int, int]:
    """q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D) or None -> T, Hq, Hkv, D."""
    _check_float("q", q, 3)
    t, hq, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        _check_float(name, x, 3, q.dtype, q.device)
        if x.shape[0] != t or x.shape[2] != d or x.shape[1] != k.shape[1]:
            raise ValueError(f"{name} must be ({t}, Hkv, {d}) like k, got {tuple(x.shape)} (q {tuple(q.shape)})")
    if d % 2:
        raise ValueError(f"head_dim {d} must be even (rotate_half splits it in two)")
    return t, hq, k.shape[1], d


def _check_cache(q, t, hkv, d, k_cache, v_cache, slots, positions) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(name, c, 4, q.dtype, q.device)
        if c.shape[2:] != (hkv, d):
            raise ValueError(f"{name} must be (max_batch, max_len, {hkv}, {d}), got {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    for name, x in (("slots", slots), ("positions", positions)):
        if x.shape != (t,) or x.dtype not in _INDEX_DTYPES or x.device != q.device:
            raise ValueError(f"{name} must be ({t},) int64 or int32 on {q.device}, got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")


def _check_section(section, half: int) -> tuple[int, int]:
    """M-RoPE section (3 sizes covering the D/2 frequencies) -> the constexpr bounds S0, S0 + S1."""
    section = [int(s) for s in section]
    if len(section) != 3 or min(section) < 0 or sum(section) != half:
        raise ValueError(f"mrope_section {section} does not cover {half} frequencies")
    return section[0], section[0] + section[1]


def _check_position_ids(position_ids, inv_freq, t: int, half: int, device) -> None:
    if position_ids.shape != (3, t) or position_ids.dtype not in _INDEX_DTYPES or position_ids.device != device:
        raise ValueError(f"position_ids must be (3, {t}) int64 or int32 on {device}, got "
                         f"{tuple(position_ids.shape)} {position_ids.dtype} on {position_ids.device}")
    if inv_freq.shape != (half,) or inv_freq.dtype != torch.float32 or inv_freq.device != device:
        raise ValueError(f"inv_freq must be ({half},) float32 on {device}, got {tuple(inv_freq.shape)} "
                         f"{inv_freq.dtype} on {inv_freq.device}")
    if half > 1 and inv_freq.stride(0) != 1:
        raise ValueError("inv_freq must be contiguous")


def _num_warps(block_h: int, block_half: int) -> int:
    # (32 q heads x 64) x 2 halves = 4096 lanes at Hq = 28 -> 4 warps, 16 elements per thread per half tile.
    return max(1, min(8, block_h * block_half // 512))


def _launch(q, k, v, qo, ko, cos, sin, position_ids, inv_freq, bounds, k_cache, v_cache, slots, positions):
    """One program per token; FUSED when position_ids is given, WRITE_CACHE when k_cache is."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if t == 0:
        return
    half = d // 2
    fused, write = position_ids is not None, k_cache is not None
    dummy = q  # pointer arguments of a branch the constexpr flags compile out
    cos, sin = (dummy, dummy) if fused else (cos, sin)
    position_ids, inv_freq = (position_ids, inv_freq) if fused else (dummy, dummy)
    v = v if v is not None else dummy
    k_cache, v_cache, slots, positions = (k_cache, v_cache, slots, positions) if write else (dummy,) * 4
    kc = k_cache.stride()[:3] if write else (0, 0, 0)
    vc = v_cache.stride()[:3] if write else (0, 0, 0)
    mb, ml = (k_cache.shape[0], k_cache.shape[1]) if write else (0, 0)
    block_hq, block_hkv = triton.next_power_of_2(hq), triton.next_power_of_2(hkv)
    block_half = triton.next_power_of_2(half)
    s0, s01 = bounds if fused else (0, 0)
    # HALF constexpr: one compile per head_dim (128 in every model), vector loads of the halves. FUSED, S0/S01
    # and WRITE_CACHE constexpr: the model's section is fixed, each variant compiles once.
    _rope_kernel[(t,)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
                       qo, qo.stride(0), qo.stride(1), ko, ko.stride(0), ko.stride(1),
                       cos, cos.stride(0), sin, sin.stride(0),
                       position_ids, position_ids.stride(0), position_ids.stride(-1), inv_freq,
                       k_cache, *kc, v_cache, *vc, slots, slots.stride(0), positions, positions.stride(0), mb, ml,
                       hq, hkv,
                       HALF=half, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half,
                       FUSED=fused, S0=s0, S01=s01, WRITE_CACHE=write,
                       num_warps=_num_warps(block_hq, block_half), **_FLAGS)


# -------------------------------------------------------------------------------------------- custom ops

_MUTATES = ("q", "k", "k_cache", "v_cache")


@torch.library.custom_op("qwen2vl_fast::rope_kv_write_triton", mutates_args=_MUTATES)
def _rope_kv_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      positions: torch.Tensor) -> None:
    """In-place op: a custom op cannot return its (mutated) inputs, so the launcher below does."""
    _check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    _launch(q, k, v, q, k, cos, sin, None, None, None, k_cache, v_cache, slots, positions)


def _check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions):
    t, _, hkv, d = _check_qkv(q, k, v)
    for name, x in (("cos", cos), ("sin", sin)):
        _check_float(name, x, 2, q.dtype, q.device)
        if x.shape != (t, d):
            raise ValueError(f"{name} must be ({t}, {d}) {q.dtype}, got {tuple(x.shape)}")
    _check_cache(q, t, hkv, d, k_cache, v_cache, slots, positions)


@_rope_kv_write_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots, positions):
    _check_rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions)


@torch.library.custom_op("qwen2vl_fast::mrope_kv_write_triton", mutates_args=_MUTATES)
def _mrope_kv_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                       inv_freq: torch.Tensor, section: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slots: torch.Tensor, positions: torch.Tensor) -> None:
    bounds = _check_mrope_kv_write(q, k, v, position_ids, inv_freq, section, k_cache, v_cache, slots, positions)
    _launch(q, k, v, q, k, None, None, position_ids, inv_freq, bounds, k_cache, v_cache, slots, positions)


def _check_mrope_kv_write(q, k, v, position_ids, inv_freq, section, k_cache, v_cache, slots, positions):
    t, _, hkv, d = _check_qkv(q, k, v)
    _check_position_ids(position_ids, inv_freq, t, d // 2, q.device)
    _check_cache(q, t, hkv, d, k_cache, v_cache, slots, positions)
    return _check_section(section, d // 2)


@_mrope_kv_write_op.register_fake
def _(q, k, v, position_ids, inv_freq, section, k_cache, v_cache, slots, positions):
    _check_mrope_kv_write(q, k, v, position_ids, inv_freq, section, k_cache, v_cache, slots, positions)


@torch.library.custom_op("qwen2vl_fast::apply_rotary_triton", mutates_args=())
def _apply_rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q3, k3, c2, s2 = _flat_rotary_args(q, k, cos, sin)
    qo = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k3.shape, dtype=q.dtype, device=q.device)
    _launch(q3, k3, None, qo, ko, c2, s2, None, None, None, None, None, None, None)
    return qo.view(q.shape), ko.view(k.shape)


def _flat_rotary_args(q, k, cos, sin):
    """(B, L, H, D) / (B, L, D) -> (B*L, H, D) / (B*L, D) views (copies only for layouts that do not merge)."""
    for name, x, dims in (("q", q, 4), ("k", k, 4), ("cos", cos, 3), ("sin", sin, 3)):
        _check_float(name, x, dims, q.dtype, q.device)
    b, L, _, d = q.shape
    if k.shape[:2] != (b, L) or k.shape[3] != d or cos.shape != (b, L, d) or sin.shape != (b, L, d):
        raise ValueError(f"apply_rotary wants q (B, L, Hq, D), k (B, L, Hkv, D), cos/sin (B, L, D): got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    q3, k3 = q.reshape(b * L, q.shape[2], d), k.reshape(b * L, k.shape[2], d)
    _check_qkv(q3, k3, None)
    return q3, k3, cos.reshape(b * L, d), sin.reshape(b * L, d)


@_apply_rotary_op.register_fake
def _(q, k, cos, sin):
    _flat_rotary_args(q, k, cos, sin)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


@torch.library.custom_op("qwen2vl_fast::mrope_cos_sin_triton", mutates_args=())
def _mrope_cos_sin_op(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pos, half, bounds = _check_cos_sin(position_ids, inv_freq, section, dtype)
    _, b, L = position_ids.shape
    cos = torch.empty(b, L, 2 * half, dtype=dtype, device=position_ids.device)
    sin = torch.empty_like(cos)
    n = b * L
    if n:
        block_t = 16  # 16 tokens x 64 frequencies per program: 8 fp32 angles per thread at 4 warps
        _cos_sin_kernel[(triton.cdiv(n, block_t),)](pos, pos.stride(0), pos.stride(1), inv_freq, cos, sin, n,
                                                    HALF=half, S0=bounds[0], S01=bounds[1], BLOCK_T=block_t,
                                                    BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **_FLAGS)
    return cos, sin


def _check_cos_sin(position_ids, inv_freq, section, dtype):
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, B, L), got {tuple(position_ids.shape)}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    half = inv_freq.shape[0] if inv_freq.dim() == 1 else -1
    pos = position_ids.reshape(3, -1)  # a view for the (3, B, L) and expanded decode layouts
    _check_position_ids(pos, inv_freq, pos.shape[1], half, position_ids.device)
    return pos, half, _check_section(section, half)


@_mrope_cos_sin_op.register_fake
def _(position_ids, inv_freq, section, dtype):
    _, half, _ = _check_cos_sin(position_ids, inv_freq, section, dtype)
    _, b, L = position_ids.shape
    cos = position_ids.new_empty((b, L, 2 * half), dtype=dtype)
    return cos, torch.empty_like(cos)


# --------------------------------------------------------------------------------------------- public API

def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, Hq, D) and k (T, Hkv, D) IN PLACE by cos/sin (T, D) (q's dtype) and write rotated k and v
    (T, Hkv, D) to k_cache / v_cache (max_batch, max_len, Hkv, D) at [slots[t], positions[t]]. Returns (q, k):
    the inputs, now rotated. Bit-identical to ops.decoding.rope_kv_write. No host sync (graph-capturable)."""
    _rope_kv_write_op(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    return q, k


def mrope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                   inv_freq: torch.Tensor, section, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_kv_write with cos/sin made in the kernel from position_ids (3, T) (int; decode: one row expanded
    to 3) and inv_freq (D/2,) fp32 over the M-RoPE `section` (3 ints summing to D/2): equal to rope_kv_write
    on mrope_cos_sin's tables (up to the libm, see the module docstring). Returns the rotated (q, k)."""
    _mrope_kv_write_op(q, k, v, position_ids, inv_freq, [int(s) for s in section], k_cache, v_cache, slots,
                       positions)
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, L, Hq, D), k (B, L, Hkv, D) rotated by cos/sin (B, L, D), all in one dtype -> new contiguous
    (q, k); bit-identical to ops.rotary.apply_rotary."""
    return _apply_rotary_op(q, k, cos, sin)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, B, L) -> cos, sin (B, L, D) in dtype (fp32 angles and trig, one rounding)."""
    return _mrope_cos_sin_op(position_ids, inv_freq, [int(s) for s in mrope_section], dtype)
