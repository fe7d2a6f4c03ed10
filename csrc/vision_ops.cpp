// Torch binding of the vision-tower kernels: rotary_2d.cu (rotary_2d_) and patch_gather.cu (patch_gather).
//
// Every Torch-side check lives here (device, dtype, layout, shapes), so the kernel files stay Torch-free; a
// launcher's Status becomes a TORCH_CHECK message. Kernels run on the current stream of the tensors' device
// (CUDA-graph capture included). Meta kernels give torch.compile / FakeTensor the output shapes.
// No CUDA header is included (binding_utils.h), so this file also compiles against a CPU-only torch.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <climits>

#include "binding_utils.h"

namespace qwen2vl_fast {
namespace {

// ---- rotary_2d_ -------------------------------------------------------------------------------------------

// Shape and dtype checks shared by the CUDA and Meta kernels; returns head_dim.
int64_t check_rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 2, msg("rotary_2d_: qkv must be (S, 3*H*D), got shape ", qkv.sizes()));
  TORCH_CHECK(num_heads > 0 && num_heads <= INT_MAX && qkv.size(1) % (3 * num_heads) == 0,
              msg("rotary_2d_: qkv's width ", qkv.size(1), " is not 3 * num_heads (", num_heads, ") * head_dim"));
  const int64_t s = qkv.size(0), d = qkv.size(1) / (3 * num_heads);
  TORCH_CHECK(d == 64 || d == 80 || d == 128, msg("rotary_2d_: head_dim must be 64, 80 or 128, got ", d));
  TORCH_CHECK(qkv.stride(1) == 1 && (s <= 1 || qkv.stride(0) >= qkv.size(1)),
              msg("rotary_2d_: qkv's rows must be contiguous and not overlap, got strides ", qkv.strides()));
  dtype_code(qkv.scalar_type(), "rotary_2d_: qkv");
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK(t->scalar_type() == at::kFloat, msg("rotary_2d_: ", name, " must be float32, got ", t->scalar_type()));
    TORCH_CHECK(t->dim() == 2 && t->size(0) == s && t->size(1) == d, msg("rotary_2d_: ", name, " must be (S, D) = (", s,
                    ", ", d, "), got ", t->sizes()));
    TORCH_CHECK(t->is_contiguous(), msg("rotary_2d_: ", name, " must be contiguous, got strides ", t->strides()));
  }
  return d;
}

void rotary_2d_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads) {
  TORCH_CHECK(qkv.is_cuda(), msg("rotary_2d_: qkv must be a CUDA tensor, got ", qkv.device()));
  TORCH_CHECK(cos.device() == qkv.device() && sin.device() == qkv.device(), msg("rotary_2d_: cos and sin must be on ",
                  qkv.device(), " with qkv, got ", cos.device(), " and ", sin.device()));
  const int64_t d = check_rotary(qkv, cos, sin, num_heads);
  const c10::DeviceGuard guard(qkv.device());
  const int status = qwen2vl_rotary_2d(qkv.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), qkv.size(0),
                                       static_cast<int>(num_heads), static_cast<int>(d), qkv.stride(0),
                                       dtype_code(qkv.scalar_type(), "qkv"), current_stream(qkv.device()));
  TORCH_CHECK(status == kOk, msg("rotary_2d_: ", status_message(status), " (qkv ", qkv.sizes(), " strides ",
                  qkv.strides(), " ", qkv.scalar_type(), ", num_heads ", num_heads, ")"));
}

void rotary_2d_meta(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads) {
  check_rotary(qkv, cos, sin, num_heads);
}

// ---- patch_gather -----------------------------------------------------------------------------------------

// Checks shared by the CUDA and Meta kernels; returns the output's (rows, cols).
std::array<int64_t, 2> check_patch_gather(const at::Tensor& frames, at::ArrayRef<double> mean,
                                          at::ArrayRef<double> std, int64_t patch, int64_t temporal_patch,
                                          int64_t merge, c10::ScalarType dtype) {
  TORCH_CHECK(frames.dim() == 4, msg("patch_gather: frames must be (T, C, H, W), got shape ", frames.sizes()));
  TORCH_CHECK(frames.scalar_type() == at::kByte, msg("patch_gather: frames must be uint8, got ", frames.scalar_type()));
  const int64_t t = frames.size(0), c = frames.size(1), h = frames.size(2), w = frames.size(3);
  TORCH_CHECK(c >= 1 && c <= kPatchGatherMaxChannels, msg("patch_gather: at most ", kPatchGatherMaxChannels,
                  " channels, got ", c));
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == c && static_cast<int64_t>(std.size()) == c, msg("patch_gather: ",
                  c, " channels but ", mean.size(), " means and ", std.size(), " stds"));
  TORCH_CHECK(patch >= 1 && patch <= 64 && temporal_patch >= 1 && temporal_patch <= 16 && merge >= 1 && merge <= 16,
              msg("patch_gather: patch (1..64), temporal_patch (1..16) or merge (1..16) out of range: ", patch, ", ",
                  temporal_patch, ", ", merge));
  const int64_t side = patch * merge;
  TORCH_CHECK(h % side == 0 && w % side == 0, msg("patch_gather: frame size ", h, "x", w,
                  " is not a multiple of patch * merge = ", side));
  dtype_code(dtype, "patch_gather: dtype");
  const int64_t rows = (t + temporal_patch - 1) / temporal_patch * (h / patch) * (w / patch);
  return {rows, c * temporal_patch * patch * patch};
}

at::Tensor patch_gather_cuda(const at::Tensor& frames, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                             int64_t patch, int64_t temporal_patch, int64_t merge, c10::ScalarType dtype) {
  TORCH_CHECK(frames.is_cuda(), msg("patch_gather: frames must be a CUDA tensor, got ", frames.device()));
  const auto shape = check_patch_gather(frames, mean, std, patch, temporal_patch, merge, dtype);
  TORCH_CHECK(frames.is_contiguous(), msg("patch_gather: frames must be contiguous, got strides ", frames.strides()));
  at::Tensor out = at::empty({shape[0], shape[1]}, frames.options().dtype(dtype));
  if (out.numel() == 0) return out;
  float mean32[kPatchGatherMaxChannels], std32[kPatchGatherMaxChannels];
  for (size_t i = 0; i < mean.size(); ++i) {  // as torch.tensor(mean): Python floats rounded to float32
    mean32[i] = static_cast<float>(mean[i]);
    std32[i] = static_cast<float>(std[i]);
  }
  const c10::DeviceGuard guard(frames.device());
  const int status = qwen2vl_patch_gather(frames.data_ptr<uint8_t>(), out.data_ptr(), frames.size(0),
                                          static_cast<int>(frames.size(1)), frames.size(2), frames.size(3), mean32,
                                          std32, static_cast<int>(patch), static_cast<int>(temporal_patch),
                                          static_cast<int>(merge), dtype_code(dtype, "dtype"),
                                          current_stream(frames.device()));
  TORCH_CHECK(status == kOk, msg("patch_gather: ", status_message(status), " (frames ", frames.sizes(), ", patch ",
                  patch, ", temporal_patch ", temporal_patch, ", merge ", merge, ", ", dtype, ")"));
  return out;
}

at::Tensor patch_gather_meta(const at::Tensor& frames, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                             int64_t patch, int64_t temporal_patch, int64_t merge, c10::ScalarType dtype) {
  const auto shape = check_patch_gather(frames, mean, std, patch, temporal_patch, merge, dtype);
  return at::empty({shape[0], shape[1]}, frames.options().dtype(dtype));
}

}  // namespace
}  // namespace qwen2vl_fast

TORCH_LIBRARY_FRAGMENT(qwen2vl_fast, m) {
  m.def("rotary_2d_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads) -> ()");
  m.def("patch_gather(Tensor frames, float[] mean, float[] std, int patch, int temporal_patch, int merge, "
        "ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2vl_fast, CUDA, m) {
  m.impl("rotary_2d_", &qwen2vl_fast::rotary_2d_cuda);
  m.impl("patch_gather", &qwen2vl_fast::patch_gather_cuda);
}

TORCH_LIBRARY_IMPL(qwen2vl_fast, Meta, m) {
  m.impl("rotary_2d_", &qwen2vl_fast::rotary_2d_meta);
  m.impl("patch_gather", &qwen2vl_fast::patch_gather_meta);
}
