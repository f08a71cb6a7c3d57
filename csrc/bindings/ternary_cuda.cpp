// CUDA implementations of the ternary ops (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "ternary/cuda_kernels.cuh"

namespace quantlab {
namespace {

ternary::DType kernel_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return ternary::DType::kFloat32;
    case at::kHalf: return ternary::DType::kFloat16;
    case at::kBFloat16: return ternary::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "ternary (cuda): ", what, " must be fp32, fp16 or bf16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "ternary (cuda): ", op, " failed: ", cudaGetErrorString(err));
}

int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

int packing_code(c10::string_view packing, const char* op) {
  TORCH_CHECK_VALUE(packing == "i2" || packing == "tq1", op,
                    ": packing must be 'i2' or 'tq1', got '", std::string(packing), "'");
  return packing == "i2" ? 0 : 1;
}

// Checks shared by the ops; returns the stored row width in bytes.
int64_t check_weight(const at::Tensor& qweight, const at::Tensor& scales, int packing,
                     int64_t in_features, int64_t group_size, const char* op) {
  TORCH_CHECK_VALUE(in_features > 0, op, ": in_features must be positive, got ", in_features);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 2, op,
                    ": qweight must be 2-D uint8, got ", qweight.scalar_type(), " ",
                    qweight.sizes());
  const int64_t n = qweight.size(0);
  const int64_t need = packing == 0 ? (in_features + 3) / 4 : (in_features + 4) / 5;
  TORCH_CHECK_VALUE(packing == 0 ? qweight.size(1) >= need : qweight.size(1) == need, op,
                    ": qweight must have ", need, packing == 0 ? "+" : "",
                    " bytes per row for in_features ", in_features, ", got ", qweight.sizes());
  TORCH_CHECK_VALUE(group_size == ternary::kCudaPerTensor || group_size == ternary::kCudaPerRow ||
                        (group_size > 0 && in_features % group_size == 0),
                    op, ": group_size must be 0 (per tensor), -1 (per row) or divide in_features ",
                    in_features, ", got ", group_size);
  const int64_t rows = group_size == ternary::kCudaPerTensor ? 1 : n;
  const int64_t cols = group_size > 0 ? in_features / group_size : 1;
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == rows && scales.size(1) == cols, op,
                    ": scales must be [", rows, ", ", cols, "], got ", scales.sizes());
  TORCH_CHECK_VALUE(qweight.is_cuda() && scales.device() == qweight.device(), op,
                    ": qweight and scales must be on the same CUDA device");
  return qweight.size(1);
}

at::Tensor dequant_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                        c10::string_view packing, int64_t in_features, int64_t group_size,
                        at::ScalarType out_dtype) {
  const char* op = "ternary_dequant";
  const int code = packing_code(packing, op);
  const int64_t row_bytes = check_weight(qweight, scales, code, in_features, group_size, op);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({q.size(0), in_features}, q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  check_launch(ternary::launch_dequant(q.data_ptr<uint8_t>(), code, row_bytes,
                                       s32.data_ptr<float>(), q.size(0), in_features, group_size,
                                       out.data_ptr(), kernel_dtype(out_dtype, "out_dtype"),
                                       c10::cuda::getCurrentCUDAStream()),
               "dequant");
  return out;
}

at::Tensor mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   c10::string_view packing, int64_t in_features, int64_t group_size) {
  const char* op = "ternary_mm";
  const int code = packing_code(packing, op);
  const int64_t row_bytes = check_weight(qweight, scales, code, in_features, group_size, op);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, op, ": x must be [M, ",
                    in_features, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == qweight.device(), op, ": x must be on ", qweight.device(),
                    ", got ", x.device());
  const ternary::DType dtype = kernel_dtype(x.scalar_type(), "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = x.size(0);
  const int64_t n = qweight.size(0);
  if (m == 0) return at::empty({0, n}, x.options());
  const at::Tensor xc = x.contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  at::Tensor q = qweight.contiguous();
  int64_t aligned_bytes = row_bytes;
  if (code != 0 || row_bytes % ternary::kCudaRowAlign != 0) {
    // The kernel reads 16-byte chunks of i2 rows. TernaryLinear keeps such a copy per device;
    // a direct call with another layout converts here, once per call.
    aligned_bytes =
        ((in_features + 3) / 4 + ternary::kCudaRowAlign - 1) / ternary::kCudaRowAlign *
        ternary::kCudaRowAlign;
    at::Tensor out = at::empty({n, aligned_bytes}, q.options());
    check_launch(ternary::launch_to_aligned_i2(q.data_ptr<uint8_t>(), code, row_bytes, n,
                                               in_features, out.data_ptr<uint8_t>(),
                                               aligned_bytes, stream),
                 "i2 alignment");
    q = out;
  }
  ternary::CudaWeight w{q.data_ptr<uint8_t>(), s32.data_ptr<float>(), n, in_features,
                        aligned_bytes, group_size};
  const bool gemv = m <= ternary::kCudaGemvMaxRows && ternary::gemv_supported(w);
  if (gemv) {
    at::Tensor y = at::empty({m, n}, x.options());
    const cudaError_t err = ternary::launch_gemv(
        w, xc.data_ptr(), y.data_ptr(), m, dtype,
        device_attribute(cudaDevAttrMultiProcessorCount),
        device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin), stream);
    if (err != cudaErrorInvalidValue) {
      check_launch(err, "gemv");
      return y;
    }
    // cudaErrorInvalidValue: one row of x does not fit in shared memory; take the GEMM path.
    (void)cudaGetLastError();
  }
  // Large batches: the same int8 activations (as floats), the dense weight, one GEMM.
  at::Tensor xq = at::empty_like(xc);
  check_launch(ternary::launch_fake_quantize_activations(xc.data_ptr(), xq.data_ptr(), m,
                                                         in_features, dtype, stream),
               "activation quantization");
  at::Tensor dense = at::empty({n, in_features}, x.options());
  check_launch(ternary::launch_dequant(q.data_ptr<uint8_t>(), 0, aligned_bytes,
                                       s32.data_ptr<float>(), n, in_features, group_size,
                                       dense.data_ptr(), dtype, stream),
               "dequant");
  return at::matmul(xq, dense.t());
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_IMPL(quantlab, CUDA, m) {
  m.impl("ternary_dequant", &quantlab::dequant_cuda);
  m.impl("ternary_mm", &quantlab::mm_cuda);
}
