"""`QuantConfig`: config.json's `quantization_config`, validated (never guessed from file or repo names).

Supported (ENGINES.md §5.2):
  quant_method "gptq": bits 4 or 8, group_size -1 or a positive int, sym, desc_act,
                       checkpoint_format "gptq" (v1: stored zero = true zero - 1) or "gptq_v2" (true zero).
  quant_method "awq":  bits 4, group_size, zero_point true, version "gemm".
Everything else (3/2-bit, AWQ gemv/gemv_fast/exllama/marlin, Marlin/BitBLAS/EXL2 layouts, GPTQModel
per-module `dynamic` overrides, unknown methods) raises `CheckpointError` naming the setting.

GPTQ's `use_exllama` / `exllama_config` (transformers' GPTQConfig) choose a kernel at run time; they do not
change what is stored, so they are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import CheckpointError

GPTQ = "gptq"
AWQ = "awq"
_GPTQ_FORMATS = {"gptq": 1, "gptq_v1": 1, "gptq_v2": 2}


@dataclass(frozen=True)
class QuantConfig:
    method: str                   # "gptq" | "awq"
    bits: int
    group_size: int               # -1: one group spanning the whole input dim
    sym: bool = True
    desc_act: bool = False
    version: int = 1              # GPTQ checkpoint format version (1 or 2); 0 for AWQ
    modules_to_not_convert: tuple = field(default_factory=tuple)
    lm_head: bool = False         # GPTQ's `lm_head: true`: lm_head stored quantized (also inferred from tensors)

    def skips(self, module_name: str) -> bool:
        """Whether `module_name` (e.g. "model.layers.0.mlp.down_proj") is listed as not converted. Entries match
        as a name component substring, the way AutoAWQ/transformers test them ("visual" skips the tower)."""
        return any(m and m in module_name for m in self.modules_to_not_convert)

    @classmethod
    def from_config(cls, config: dict) -> Optional["QuantConfig"]:
        """From a whole config.json dict: None when it has no `quantization_config`."""
        if not isinstance(config, dict):
            raise CheckpointError(f"config must be a dict, got {type(config).__name__}")
        qc = config.get("quantization_config")
        if qc is None:
            text = config.get("text_config")
            qc = text.get("quantization_config") if isinstance(text, dict) else None
        return None if qc is None else cls.parse(qc)

    @classmethod
    def parse(cls, qc: dict) -> "QuantConfig":
        """From a `quantization_config` dict."""
        if not isinstance(qc, dict):
            raise CheckpointError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
        method = str(qc.get("quant_method", "")).lower()
        if method == GPTQ:
            return cls._parse_gptq(qc)
        if method == AWQ:
            return cls._parse_awq(qc)
        raise CheckpointError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported "
                              "(supported: 'gptq', 'awq')")


    @staticmethod
    def _common(qc: dict, allowed_bits: tuple) -> tuple[int, int, tuple]:
        bits = qc.get("bits", qc.get("w_bit"))
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed_bits:
            raise CheckpointError(f"quantization_config.bits={bits!r} is not supported for "
                                  f"{qc.get('quant_method')} (supported: {', '.join(map(str, allowed_bits))})")
        gs = qc.get("group_size", qc.get("q_group_size", -1))
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
            raise CheckpointError(f"quantization_config.group_size={gs!r} is not supported "
                                  "(a positive integer, or -1 for one group per row)")
        skip = qc.get("modules_to_not_convert") or ()
        if isinstance(skip, str) or not all(isinstance(m, str) for m in skip):
            raise CheckpointError(f"quantization_config.modules_to_not_convert={skip!r} must be a list of names")
        return bits, gs, tuple(skip)

    @classmethod
    def _parse_gptq(cls, qc: dict) -> "QuantConfig":
        bits, gs, skip = cls._common(qc, (4, 8))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in _GPTQ_FORMATS:
            raise CheckpointError(f"quantization_config.checkpoint_format={qc.get('checkpoint_format')!r} is not "
                                  "supported (supported: 'gptq' (v1), 'gptq_v2'; Marlin/BitBLAS/EXL2 repacked "
                                  "layouts must be re-exported as GPTQ)")
        for flag in ("is_marlin_format", "is_bitblas_format"):
            if qc.get(flag):
                raise CheckpointError(f"quantization_config.{flag}=true is not supported (re-export as GPTQ)")
        if qc.get("dynamic"):
            raise CheckpointError("quantization_config.dynamic (GPTQModel per-module overrides) is not supported")
        sym = qc.get("sym", True)
        desc_act = qc.get("desc_act", False)
        if not isinstance(sym, bool) or not isinstance(desc_act, bool):
            raise CheckpointError(f"quantization_config.sym={sym!r} / desc_act={desc_act!r} must be booleans")
        return cls(GPTQ, bits, gs, sym=sym, desc_act=desc_act, version=_GPTQ_FORMATS[fmt],
                   modules_to_not_convert=skip, lm_head=bool(qc.get("lm_head", False)))

    @classmethod
    def _parse_awq(cls, qc: dict) -> "QuantConfig":
        bits, gs, skip = cls._common(qc, (4,))
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"quantization_config.version={qc.get('version')!r} is not supported for AWQ "
                                  "(only 'gemm'; gemv/gemv_fast/exllama/marlin store other layouts)")
        zp = qc.get("zero_point", True)
        if zp is not True:
            raise CheckpointError(f"quantization_config.zero_point={zp!r} is not supported for AWQ (only true)")
        return cls(AWQ, bits, gs, sym=False, desc_act=False, version=0, modules_to_not_convert=skip)
