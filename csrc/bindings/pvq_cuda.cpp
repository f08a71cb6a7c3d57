// CUDA implementations of the PVQ ops (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "bindings/pvq_checks.h"
#include "pvq/cuda_kernels.cuh"
#include "pvq/pvq_decode.h"

namespace quantlab {
namespace {

pvq::DType kernel_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return pvq::DType::kFloat32;
    case at::kHalf: return pvq::DType::kFloat16;
    case at::kBFloat16: return pvq::DType::kBFloat16;
    default: TORCH_CHECK(false, "pvq (cuda): ", what, " must be fp32, fp16 or bf16, got ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pvq (cuda): ", op, " launch failed: ", cudaGetErrorString(err));
}

struct DeviceCounts {
  at::Tensor table;  // int64 [(dim + 1) * (pulses + 1)] holding the uint64 counts
  uint64_t size;     // N(dim, pulses)
};

// The count table N(n, k) on a device, built on the host once per (dim, pulses, device).
DeviceCounts device_counts(int dim, int pulses, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, DeviceCounts> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(dim, pulses, static_cast<int>(device.index()));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  std::vector<uint64_t> host(pvq::count_entries(dim, pulses));
  TORCH_CHECK(pvq::fill_counts(dim, pulses, host.data()), "pvq (cuda): N(", dim, ", ", pulses,
              ") does not fit 63 bits");
  at::Tensor cpu = at::empty({static_cast<int64_t>(host.size())}, at::TensorOptions(at::kLong));
  std::memcpy(cpu.data_ptr<int64_t>(), host.data(), host.size() * sizeof(uint64_t));
  DeviceCounts counts{cpu.to(device), host[dim * (pulses + 1) + pulses]};
  cache.emplace(key, counts);
  return counts;
}

struct PreparedWeight {
  pvq::CudaWeight w;
  at::Tensor codes, scales32, levels32, counts;  // kept alive during the launch
};

PreparedWeight prepare(const PvqArgs& a, const at::Tensor& codes, const at::Tensor& row_scales,
                       const at::Tensor& levels) {
  PreparedWeight p;
  p.codes = codes.contiguous();
  p.scales32 = row_scales.to(at::kFloat).contiguous();
  p.levels32 = levels.to(at::kFloat).contiguous();
  const DeviceCounts counts = device_counts(a.dim, a.pulses, codes.device());
  p.counts = counts.table;
  p.w.codes = reinterpret_cast<const uint32_t*>(p.codes.data_ptr<int32_t>());
  p.w.n_words = a.n_words;
  p.w.row_scales = p.scales32.data_ptr<float>();
  p.w.levels = p.levels32.data_ptr<float>();
  p.w.n_levels = a.levels;
  p.w.counts = reinterpret_cast<const uint64_t*>(p.counts.data_ptr<int64_t>());
  p.w.size = counts.size;
  p.w.n = a.n;
  p.w.k = a.k;
  p.w.dim = a.dim;
  p.w.pulses = a.pulses;
  p.w.code_bits = a.code_bits;
  return p;
}

at::Tensor decode_cuda(const at::Tensor& codes, const at::Tensor& row_scales,
                       const at::Tensor& levels, int64_t dim, int64_t pulses, int64_t in_features,
                       at::ScalarType out_dtype) {
  const PvqArgs a = check_pvq(codes, row_scales, levels, dim, pulses, in_features, "cuda");
  const c10::cuda::CUDAGuard guard(codes.device());
  const PreparedWeight p = prepare(a, codes, row_scales, levels);
  at::Tensor out = at::empty({a.n, a.k}, codes.options().dtype(out_dtype));
  check_launch(pvq::launch_decode(p.w, out.data_ptr(), kernel_dtype(out_dtype, "out_dtype"),
                                  c10::cuda::getCurrentCUDAStream()),
               "decode");
  return out;
}

at::Tensor mm_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scales,
                   const at::Tensor& levels, int64_t dim, int64_t pulses) {
  TORCH_CHECK(x.dim() == 2, "pvq_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && x.device() == codes.device(), "pvq_mm: x must be on ",
              codes.device(), ", got ", x.device());
  const PvqArgs a = check_pvq(codes, row_scales, levels, dim, pulses, x.size(1), "cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  if (m > pvq::kGemvMaxRows || m == 0) {
    // Compute-bound regime: decode in the activation dtype and let cuBLAS run the GEMM.
    const at::Tensor w = decode_cuda(codes, row_scales, levels, dim, pulses, a.k, x.scalar_type());
    return at::matmul(x, w.t());
  }
  const PreparedWeight p = prepare(a, codes, row_scales, levels);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, a.n}, x.options());
  check_launch(pvq::launch_gemv(p.w, xc.data_ptr(), y.data_ptr(), m, kernel_dtype(x.scalar_type(), "x"),
                                c10::cuda::getCurrentCUDAStream()),
               "gemv");
  return y;
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_IMPL(quantlab, CUDA, m) {
  m.impl("pvq_decode", &quantlab::decode_cuda);
  m.impl("pvq_mm", &quantlab::mm_cuda);
}
