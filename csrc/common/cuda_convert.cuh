// float <-> activation-dtype conversions shared by the CUDA kernels. They are spelled out because
// torch's CUDA builds define __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__: no
// implicit float <-> 16-bit conversion may be relied on. Rounding is to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace quantlab {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "to_float: float, __half or __nv_bfloat16");
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "from_float: float, __half or __nv_bfloat16");
    return __float2bfloat16_rn(v);
  }
}

}  // namespace quantlab
