// Error plumbing for torch-free CUDA launchers: they return cudaError_t and never throw, so the
// caller (a torch binding, or a plain C++ test) decides how to report.
#pragma once

#include <cuda_runtime.h>

// Returns the error of `expr` from the enclosing function when it is not cudaSuccess.
#define QUANTLAB_CUDA_RETURN_IF_ERROR(expr)   \
  do {                                        \
    const cudaError_t quantlab_err_ = (expr); \
    if (quantlab_err_ != cudaSuccess) return quantlab_err_; \
  } while (0)

// A launch's configuration error (bad grid, too many registers, no kernel image for this GPU) is
// only visible through cudaGetLastError right after the <<<...>>>.
#define QUANTLAB_CUDA_RETURN_LAUNCH_ERROR() return cudaGetLastError()
