// Helpers shared by the Torch bindings (.cpp files): dtype codes and the current stream, without CUDA headers.
//
// The device guard and the current stream come from c10's device-generic interfaces (libtorch_cuda registers
// their CUDA implementations), so the bindings also compile against a CPU-only torch, which is how CI checks them.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "kernels.h"

namespace qwen2vl_fast {

inline int dtype_code(c10::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

}  // namespace qwen2vl_fast
