// The extension qwen2vl_fast._C: op schemas in the `qwen2vl_fast` Torch library namespace.
//
// Ops are registered with TORCH_LIBRARY (not bare pybind functions) so torch.compile and CUDA-graph capture
// see each as one node. Each kernel family adds its schema in its own TORCH_LIBRARY_FRAGMENT next to its
// launcher binding; this file only opens the namespace and gives Python a module to import.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qwen2vl_fast, m) {}

// Importing qwen2vl_fast._C runs the static registrations above; the module itself holds nothing.
static struct PyModuleDef qwen2vl_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&qwen2vl_fast_c_module); }
