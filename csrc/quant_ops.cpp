// Torch binding of the weight-only decode GEMMs: quant_gemm_decode (quant_decode_gemm.cu) and
// quant_gemm_decode_marlin (quant_decode_marlin.cu, same schema and checks).
//
// Every Torch-side check lives here (device, dtype, layout, shapes); a launcher's Status becomes a TORCH_CHECK
// message. The kernel runs on the current stream (CUDA-graph capture included); its split-K partials come from
// the caching allocator, and its per-column-tile counters are a zeroed int32 buffer the caller keeps (the kernel
// leaves it zeroed). No CUDA header is included (binding_utils.h), so this file compiles against a CPU-only torch.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "binding_utils.h"

namespace qwen2vl_fast {
namespace {

// Checks shared by the CUDA and Meta kernels; returns (M, N, K).
std::array<int64_t, 3> check_quant_decode(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                          const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                                          int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, msg("quant_gemm_decode: bits must be 4 or 8, got ", bits));
  TORCH_CHECK(x.dim() == 2, msg("quant_gemm_decode: x must be (M, K), got shape ", x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              msg("quant_gemm_decode: x must be float16 or bfloat16 (tensor-core operands), got ", x.scalar_type()));
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              msg("quant_gemm_decode: qweight must be int32 (K * bits / 32, N), got ", qweight.scalar_type(), " ",
                  qweight.sizes()));
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1), per_word = 32 / bits, step = 4 * per_word;
  TORCH_CHECK(qweight.size(0) * per_word == k, msg("quant_gemm_decode: qweight's ", qweight.size(0), " rows hold ",
                  qweight.size(0) * per_word, " inputs of ", bits, " bits, x has K = ", k));
  TORCH_CHECK(m <= 16, msg("quant_gemm_decode: at most 16 rows (the decode regime), got ", m));
  TORCH_CHECK(n % 8 == 0 && n > 0, msg("quant_gemm_decode: N must be a positive multiple of 8, got ", n));
  TORCH_CHECK(k % step == 0 && k > 0, msg("quant_gemm_decode: K must be a positive multiple of ", step, " for ", bits,
                  "-bit weights, got ", k));
  const int64_t group = group_size == -1 ? k : group_size;
  TORCH_CHECK(group > 0 && k % group == 0 && group % step == 0, msg("quant_gemm_decode: group_size ", group_size,
                  " must be -1 or divide K = ", k, " and be a multiple of ", step));
  for (const at::Tensor* t : {&scales, &zeros}) {
    const char* name = t == &scales ? "scales" : "zeros";
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), msg("quant_gemm_decode: ", name, " must be ", x.scalar_type(),
                    " like x, got ", t->scalar_type()));
    TORCH_CHECK(t->dim() == 2 && t->size(0) == k / group && t->size(1) == n, msg("quant_gemm_decode: ", name,
                    " must be (K / group, N) = (", k / group, ", ", n, "), got ", t->sizes()));
    TORCH_CHECK(t->is_contiguous(), msg("quant_gemm_decode: ", name, " must be contiguous"));
  }
  TORCH_CHECK(qweight.is_contiguous(), "quant_gemm_decode: qweight must be contiguous");
  TORCH_CHECK(x.stride(1) == 1, msg("quant_gemm_decode: x's rows must be contiguous, got strides ", x.strides()));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(),
                msg("quant_gemm_decode: bias must be a contiguous (", n, ",) ", x.scalar_type(), " tensor, got ",
                    bias->scalar_type(), " ", bias->sizes()));
  }
  return {m, n, k};
}

using WorkspaceFn = int (*)(int64_t, int64_t, int64_t, int, int64_t, int, int64_t*, int64_t*);
using LaunchFn = int (*)(const void*, int64_t, const int32_t*, const void*, const void*, const void*, void*, float*,
                         int64_t, int32_t*, int64_t, int64_t, int64_t, int64_t, int, int64_t, int, cudaStream_t);

// The CUDA kernel of both decode GEMMs (quant_gemm_decode, quant_gemm_decode_marlin): every check before any
// data access, then the kernel's workspace query and launch.
at::Tensor run_decode(WorkspaceFn workspace, LaunchFn launch, const at::Tensor& x, const at::Tensor& qweight,
                      const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                      int64_t bits, int64_t group_size, at::Tensor& counters) {
  TORCH_CHECK(x.is_cuda(), msg("quant_gemm_decode: x must be a CUDA tensor, got ", x.device()));
  for (const at::Tensor* t : {&qweight, &scales, &zeros, static_cast<const at::Tensor*>(&counters)})
    TORCH_CHECK(t->device() == x.device(), msg("quant_gemm_decode: every tensor must be on ", x.device(), ", got ",
                    t->device()));
  TORCH_CHECK(!bias.has_value() || bias->device() == x.device(),
              msg("quant_gemm_decode: bias must be on ", x.device()));
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous(),
              "quant_gemm_decode: counters must be a contiguous int32 buffer of zeros");
  const auto [m, n, k] = check_quant_decode(x, qweight, scales, zeros, bias, bits, group_size);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const c10::DeviceGuard guard(x.device());
  const int code = dtype_code(x.scalar_type(), "x");
  int64_t floats = 0, tiles = 0;
  int status = workspace(m, n, k, static_cast<int>(bits), group_size, code, &floats, &tiles);
  TORCH_CHECK(status == kOk, msg("quant_gemm_decode: ", status_message(status), " while planning (M ", m, ", N ", n,
                  ", K ", k, ")"));
  TORCH_CHECK(counters.numel() >= tiles, msg("quant_gemm_decode: the counters buffer holds ", counters.numel(),
                  " entries, this launch needs ", tiles));
  at::Tensor scratch;
  if (floats > 0) scratch = at::empty({floats}, x.options().dtype(at::kFloat));
  const int64_t x_stride = m > 1 ? x.stride(0) : k;  // one row: its stride is never used
  status = launch(
      x.data_ptr(), x_stride, qweight.data_ptr<int32_t>(), scales.data_ptr(), zeros.data_ptr(),
      bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), floats > 0 ? scratch.data_ptr<float>() : nullptr,
      floats, counters.data_ptr<int32_t>(), counters.numel(), m, n, k, static_cast<int>(bits), group_size, code,
      current_stream(x.device()));
  TORCH_CHECK(status == kOk, msg("quant_gemm_decode: ", status_message(status), " (x ", x.sizes(), " strides ",
                  x.strides(), " ", x.scalar_type(), ", N ", n, ", ", bits, " bits, group ", group_size, ")"));
  return y;
}

at::Tensor quant_gemm_decode_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                  const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                                  int64_t group_size, at::Tensor& counters) {
  return run_decode(&qwen2vl_quant_decode_workspace, &qwen2vl_quant_gemm_decode, x, qweight, scales, zeros, bias,
                    bits, group_size, counters);
}

// csrc/quant_decode_marlin.cu: the same op with the Marlin-class inner loop (a candidate of the measured dispatch).
at::Tensor quant_gemm_decode_marlin_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                         const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                                         int64_t group_size, at::Tensor& counters) {
  return run_decode(&qwen2vl_quant_marlin_workspace, &qwen2vl_quant_gemm_marlin, x, qweight, scales, zeros, bias,
                    bits, group_size, counters);
}

at::Tensor quant_gemm_decode_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                  const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                                  int64_t group_size, at::Tensor& counters) {
  const auto [m, n, k] = check_quant_decode(x, qweight, scales, zeros, bias, bits, group_size);
  (void)k;
  (void)counters;
  return at::empty({m, n}, x.options());
}

}  // namespace
}  // namespace qwen2vl_fast

TORCH_LIBRARY_FRAGMENT(qwen2vl_fast, m) {
  m.def("quant_gemm_decode(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
        "int group_size, Tensor(a!) counters) -> Tensor");
  m.def("quant_gemm_decode_marlin(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
        "int group_size, Tensor(a!) counters) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2vl_fast, CUDA, m) {
  m.impl("quant_gemm_decode", &qwen2vl_fast::quant_gemm_decode_cuda);
  m.impl("quant_gemm_decode_marlin", &qwen2vl_fast::quant_gemm_decode_marlin_cuda);
}

TORCH_LIBRARY_IMPL(qwen2vl_fast, Meta, m) {
  m.impl("quant_gemm_decode", &qwen2vl_fast::quant_gemm_decode_meta);
  m.impl("quant_gemm_decode_marlin", &qwen2vl_fast::quant_gemm_decode_meta);
}
