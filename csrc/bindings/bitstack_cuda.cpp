// CUDA implementations of the BitStack ops (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "bindings/bitstack_checks.h"
#include "bitstack/cuda_kernels.cuh"

namespace quantlab {
namespace {

// Weights rebuilt at a time on the many-rows path (bounded scratch; never the whole weight).
constexpr int64_t kTileWeights = int64_t{1} << 24;

bitstack::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return bitstack::DType::kFloat16;
    case at::kBFloat16: return bitstack::DType::kBFloat16;
    case at::kFloat: return bitstack::DType::kFloat32;
    default: TORCH_CHECK(false, "bitstack (cuda): dtype must be fp32, fp16 or bf16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "bitstack (cuda): ", op, " launch failed: ",
              cudaGetErrorString(err));
}

struct Prepared {
  bitstack::CudaWeight w;
  at::Tensor signs, u16, v16;
};

Prepared prepare(const BitStackArgs& a, const at::Tensor& signs, const at::Tensor& u,
                 const at::Tensor& v) {
  Prepared p;
  p.signs = signs.contiguous();
  p.u16 = u.to(at::kHalf).contiguous();
  p.v16 = v.to(at::kHalf).contiguous();
  p.w.signs = p.signs.data_ptr<uint8_t>();
  p.w.u = reinterpret_cast<const uint16_t*>(p.u16.data_ptr<at::Half>());
  p.w.v = reinterpret_cast<const uint16_t*>(p.v16.data_ptr<at::Half>());
  p.w.blocks = a.blocks;
  p.w.n = a.n;
  p.w.k = a.k;
  p.w.rank = a.rank;
  return p;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor dequant_cuda(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                        int64_t in_features, at::ScalarType out_dtype) {
  const BitStackArgs a = check_bitstack(signs, u, v, in_features, "cuda");
  const c10::cuda::CUDAGuard guard(signs.device());
  const Prepared p = prepare(a, signs, u, v);
  at::Tensor out = at::empty({a.n, a.k}, signs.options().dtype(out_dtype));
  check_launch(bitstack::launch_dequant_rows(p.w, 0, a.n, out.data_ptr(), kernel_dtype(out_dtype),
                                             c10::cuda::getCurrentCUDAStream()),
               "dequant");
  return out;
}

at::Tensor mm_cuda(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& u,
                   const at::Tensor& v) {
  TORCH_CHECK(x.dim() == 2, "bitstack_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && x.device() == signs.device(), "bitstack_mm: x must be on ",
              signs.device(), ", got ", x.device());
  const BitStackArgs a = check_bitstack(signs, u, v, x.size(1), "cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  const Prepared p = prepare(a, signs, u, v);
  const bitstack::DType dtype = kernel_dtype(x.scalar_type());
  at::Tensor y = at::empty({m, a.n}, x.options());
  if (m == 0) return y;
  if (dtype != bitstack::DType::kFloat32 && bitstack::gemv_supported(p.w, m)) {
    // The kernel reads x in 4-byte pairs: a misaligned view is copied once.
    at::Tensor xc = x.contiguous();
    if (!aligned16(xc)) xc = xc.clone();
    check_launch(bitstack::launch_gemv(p.w, xc.data_ptr(), y.data_ptr(), m, dtype,
                                       c10::cuda::getCurrentCUDAStream()),
                 "gemv");
    return y;
  }
  // Compute-bound (or fp32 activations, or a shape the GEMV does not take): rebuild tiles of
  // output rows in the activation dtype and let cuBLAS multiply them.
  const int64_t rows = std::max<int64_t>(64, std::min<int64_t>(a.n, kTileWeights / a.k));
  at::Tensor tile = at::empty({rows, a.k}, x.options());
  for (int64_t r0 = 0; r0 < a.n; r0 += rows) {
    const int64_t r1 = std::min(a.n, r0 + rows);
    check_launch(bitstack::launch_dequant_rows(p.w, r0, r1, tile.data_ptr(), dtype,
                                               c10::cuda::getCurrentCUDAStream()),
                 "dequant rows");
    y.narrow(1, r0, r1 - r0).copy_(at::matmul(x, tile.narrow(0, 0, r1 - r0).t()));
  }
  return y;
}

// Which path bitstack_mm takes on CUDA for these arguments: "tensor-core-gemv" or "tiled-gemm".
std::string cuda_path(int64_t m, int64_t in_features, int64_t rank, at::ScalarType dtype) {
  TORCH_CHECK(m >= 0 && in_features > 0 && rank >= 1,
              "bitstack_cuda_path: m >= 0, in_features > 0 and rank >= 1 are required");
  bitstack::CudaWeight w{};
  w.blocks = 1;
  w.n = 1;
  w.k = in_features;
  w.rank = rank;
  const bool gemv = dtype != at::kFloat && bitstack::gemv_supported(w, m);
  return gemv ? "tensor-core-gemv" : "tiled-gemm";
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def("bitstack_cuda_path(int m, int in_features, int rank, ScalarType dtype) -> str",
        &quantlab::cuda_path);
}

TORCH_LIBRARY_IMPL(quantlab, CUDA, m) {
  m.impl("bitstack_dequant", &quantlab::dequant_cuda);
  m.impl("bitstack_mm", &quantlab::mm_cuda);
}
