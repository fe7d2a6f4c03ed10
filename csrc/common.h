// Shared between Torch-free kernel files (.cu) and the Torch binding (bindings.cpp).
//
// Kernel files take raw pointers, sizes and a stream and return one of these codes, so CI can compile
// them with nvcc alone (no Torch headers) and the binding turns a code into a readable TORCH_CHECK message.
#pragma once

namespace qwen2vl_fast {

enum Status : int {
  kOk = 0,
  kBadShape = 1,      // sizes the kernel cannot handle (e.g. a head_dim it was not instantiated for)
  kBadAlignment = 2,  // a pointer or stride breaks the vector-load alignment the kernel assumes
  kLaunchFailed = 3,  // cudaGetLastError() after the launch was not cudaSuccess
};

inline const char* status_message(int status) {
  switch (status) {
    case kOk: return "ok";
    case kBadShape: return "unsupported shape";
    case kBadAlignment: return "misaligned pointer or stride";
    case kLaunchFailed: return "kernel launch failed";
    default: return "unknown error";
  }
}

}  // namespace qwen2vl_fast
