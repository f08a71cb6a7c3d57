// bf16-activation instances of the mma kernel (cuda_mma_kernel.cuh); fp16 ones are in
// cuda_mma_f16.cu, so the two compile in parallel.
#include "groupwise_int/cuda_mma_kernel.cuh"

namespace quantlab::groupwise_int::mma {

#define QUANTLAB_MMA_LAUNCH(T, S, B, M) launch_instance<T, S, B, M>(a, grid, stream)
#define QUANTLAB_MMA_OCCUPANCY(T, S, B, M) occupancy_instance<T, S, B, M>()

template <>
cudaError_t launch_for_act<__nv_bfloat16>(const Args& a, dim3 grid, int mb, cudaStream_t stream) {
  QUANTLAB_MMA_DISPATCH(__nv_bfloat16, a.w.scale_dtype, a.w.bits, mb, QUANTLAB_MMA_LAUNCH);
}

template <>
int occupancy_for_act<__nv_bfloat16>(DType scale_dtype, int bits, int mb) {
  QUANTLAB_MMA_DISPATCH(__nv_bfloat16, scale_dtype, bits, mb, QUANTLAB_MMA_OCCUPANCY);
}

}  // namespace quantlab::groupwise_int::mma
