// Helpers shared by the Torch bindings (.cpp files): dtype codes and the current stream, without CUDA headers.
//
// The device guard and the current stream come from c10's device-generic interfaces (libtorch_cuda registers
// their CUDA implementations), so the bindings also compile against a CPU-only torch, which is how CI checks them.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <string>
#include <type_traits>

#include "kernels.h"

namespace qwen2vl_fast {

// ---- error texts without iostreams ----------------------------------------------------------------------------
//
// Every TORCH_CHECK here gets one std::string built by msg(), which TORCH_CHECK passes through as it is, so no
// message of ours goes through c10::str's std::ostringstream. Why: on the first H200 run (torch 2.11 wheel, _C
// built there) each failing check whose message streamed an integer killed the process, while a failing check
// that streamed only text and dtypes raised its RuntimeError (bench/results/gpu_check-nvidia-h200-20261130.md).
// Integers are the pieces that go through the stream's locale (its num_put facet); std::to_string writes digits
// without a stream or a locale. bench/diagnose_cuda_ext_errors.py keeps the cases that tell the causes apart.
namespace text {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <class I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
inline std::string piece(I v) {
  return std::to_string(v);
}
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }  // "BFloat16", as torch prints it
inline std::string piece(const c10::Device& d) { return d.str(); }        // "cuda:0"
inline std::string piece(at::IntArrayRef a) {                                // "[8, 474]", as torch prints sizes
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
}  // namespace text

// The pieces' texts, concatenated: TORCH_CHECK(cond, msg("x has ", n, " rows, got shape ", x.sizes())).
template <class... Pieces>
std::string msg(const Pieces&... pieces) {
  std::string s;
  (s += ... += text::piece(pieces));
  return s;
}

inline int dtype_code(c10::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, msg(what, " must be float32, float16 or bfloat16, got ", t));
  }
  return -1;
}

inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

}  // namespace qwen2vl_fast
