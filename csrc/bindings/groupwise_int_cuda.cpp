// CUDA implementations of the groupwise_int ops (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/groupwise_int_checks.h"
#include "groupwise_int/cuda_kernels.cuh"

namespace quantlab {
namespace {

groupwise_int::DType kernel_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return groupwise_int::DType::kFloat32;
    case at::kHalf: return groupwise_int::DType::kFloat16;
    case at::kBFloat16: return groupwise_int::DType::kBFloat16;
    default: TORCH_CHECK(false, "groupwise_int (cuda): ", what, " must be fp32, fp16 or bf16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "groupwise_int (cuda): ", op, " launch failed: ",
              cudaGetErrorString(err));
}

struct PreparedWeight {
  groupwise_int::CudaWeight w;
  at::Tensor qweight, scales32, qzeros;  // keep the contiguous copies alive during the launch
};

PreparedWeight prepare(const GroupwiseIntArgs& a, const at::Tensor& qweight,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros) {
  PreparedWeight p;
  p.qweight = qweight.contiguous();
  p.scales32 = scales.to(at::kFloat).contiguous();
  if (qzeros.has_value()) p.qzeros = qzeros->contiguous();
  p.w.qweight = reinterpret_cast<const uint32_t*>(p.qweight.data_ptr<int32_t>());
  p.w.scales = p.scales32.data_ptr<float>();
  p.w.qzeros = qzeros.has_value() ? reinterpret_cast<const uint32_t*>(p.qzeros.data_ptr<int32_t>())
                                  : nullptr;
  p.w.n = a.n;
  p.w.k = a.k;
  p.w.group_size = a.group_size;
  p.w.bits = static_cast<int>(a.bits);
  return p;
}

at::Tensor dequant_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size,
                        int64_t in_features, at::ScalarType out_dtype) {
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, in_features, "cuda");
  const c10::cuda::CUDAGuard guard(qweight.device());
  const PreparedWeight p = prepare(a, qweight, scales, qzeros);
  at::Tensor out = at::empty({a.n, a.k}, qweight.options().dtype(out_dtype));
  check_launch(groupwise_int::launch_dequant(p.w, out.data_ptr(), kernel_dtype(out_dtype, "out_dtype"),
                                             c10::cuda::getCurrentCUDAStream()),
               "dequant");
  return out;
}

at::Tensor mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "groupwise_int_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(),
              "groupwise_int_mm: x must be on ", qweight.device(), ", got ", x.device());
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, x.size(1), "cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  if (m > groupwise_int::kGemvMaxRows) {
    // Compute-bound regime: dequantize in the activation dtype and let cuBLAS run the GEMM.
    const at::Tensor w = dequant_cuda(qweight, scales, qzeros, bits, group_size, a.k, x.scalar_type());
    return at::matmul(x, w.t());
  }
  const PreparedWeight p = prepare(a, qweight, scales, qzeros);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, a.n}, x.options());
  check_launch(groupwise_int::launch_gemv(p.w, xc.data_ptr(), y.data_ptr(), m,
                                          kernel_dtype(x.scalar_type(), "x"),
                                          c10::cuda::getCurrentCUDAStream()),
               "gemv");
  return y;
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_IMPL(quantlab, CUDA, m) {
  m.impl("groupwise_int_dequant", &quantlab::dequant_cuda);
  m.impl("groupwise_int_mm", &quantlab::mm_cuda);
}
