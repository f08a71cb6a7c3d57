// fp16-activation instances of the mma kernel (cuda_mma_kernel.cuh); bf16 ones are in
// cuda_mma_bf16.cu, so the two compile in parallel.
#include "groupwise_int/cuda_mma_kernel.cuh"

namespace quantlab::groupwise_int::mma {

#define QUANTLAB_MMA_LAUNCH(T, S, B, M) launch_instance<T, S, B, M>(a, grid, stream)
#define QUANTLAB_MMA_OCCUPANCY(T, S, B, M) occupancy_instance<T, S, B, M>()

template <>
cudaError_t launch_for_act<__half>(const Args& a, dim3 grid, int mb, cudaStream_t stream) {
  QUANTLAB_MMA_DISPATCH(__half, a.w.scale_dtype, a.w.bits, mb, QUANTLAB_MMA_LAUNCH);
}

template <>
int occupancy_for_act<__half>(DType scale_dtype, int bits, int mb) {
  QUANTLAB_MMA_DISPATCH(__half, scale_dtype, bits, mb, QUANTLAB_MMA_OCCUPANCY);
}

}  // namespace quantlab::groupwise_int::mma
