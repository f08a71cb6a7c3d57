// CUDA implementations of the groupwise_int ops (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>

#include "bindings/groupwise_int_checks.h"
#include "groupwise_int/cuda_kernels.cuh"
#include "groupwise_int/cuda_mma.cuh"

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

// Batches above kGemvMaxRows and up to this many rows run the fused tensor-core GEMM
// (cuda_gemm.cu); from 256 rows on the GEMM is compute-bound and dequantize + cuBLAS wins.
constexpr int64_t kFusedGemmMaxRows = groupwise_int::kGemmMaxRows;
static_assert(kFusedGemmMaxRows == 255, "the fused GEMM takes M < 256");

enum class CudaPath { kGemv, kGemm, kDequantMatmul };

const char* path_name(CudaPath p) {
  switch (p) {
    case CudaPath::kGemv: return "gemv";
    case CudaPath::kGemm: return "gemm";
    case CudaPath::kDequantMatmul: return "dequant-matmul";
  }
  return "?";
}

// Shape and encoding only (no pointers): enough to decide the path.
groupwise_int::CudaWeight weight_shape(int64_t n, int64_t k, int64_t group_size, int64_t bits) {
  groupwise_int::CudaWeight w{};
  w.n = n;
  w.k = k;
  w.group_size = group_size == -1 ? k : group_size;
  w.bits = static_cast<int>(bits);
  return w;
}

// An attribute of the current device (plain runtime API: ATen/cuda/CUDAContext.h would pull in
// the cuBLAS/cuSPARSE headers for two integers).
int current_device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// The fused GEMM needs fp16/bf16 activations, a weight it supports and wmma (sm_80+) on the
// current device.
bool gemm_applies(at::ScalarType dtype, const groupwise_int::CudaWeight& w) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) && groupwise_int::gemm_supported(w) &&
         current_device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8;
}

CudaPath pick_path(int64_t m, at::ScalarType dtype, const groupwise_int::CudaWeight& w) {
  if (m <= groupwise_int::kGemvMaxRows) return CudaPath::kGemv;
  if (m <= kFusedGemmMaxRows && gemm_applies(dtype, w)) return CudaPath::kGemm;
  return CudaPath::kDequantMatmul;
}

// y = x @ W^T with the fused GEMM. split_k 0: the SM-count heuristic; >= 1: forced (clamped).
void run_gemm(const groupwise_int::CudaWeight& w, const at::Tensor& xc, at::Tensor& y,
              int64_t split_k) {
  const int64_t m = xc.size(0);
  const int splits =
      split_k > 0
          ? static_cast<int>(std::min<int64_t>(split_k, groupwise_int::kGemmMaxSplits))
          : groupwise_int::gemm_pick_splits(
                m, w.n, w.k, current_device_attribute(cudaDevAttrMultiProcessorCount));
  const size_t bytes = groupwise_int::gemm_workspace_bytes(m, w.n, w.k, splits);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))},
                          xc.options().dtype(at::kFloat));
  }
  check_launch(groupwise_int::launch_gemm(w, xc.data_ptr(), y.data_ptr(), m,
                                          kernel_dtype(xc.scalar_type(), "x"), splits,
                                          bytes > 0 ? workspace.data_ptr<float>() : nullptr,
                                          c10::cuda::getCurrentCUDAStream()),
               "gemm");
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
  const CudaPath path =
      pick_path(m, x.scalar_type(), weight_shape(a.n, a.k, a.group_size, a.bits));
  if (path == CudaPath::kDequantMatmul) {
    // Compute-bound regime (or fp32 activations): dequantize in the activation dtype and let
    // cuBLAS run the GEMM.
    const at::Tensor w = dequant_cuda(qweight, scales, qzeros, bits, group_size, a.k, x.scalar_type());
    return at::matmul(x, w.t());
  }
  // No rows: nothing to launch (a grid of zero blocks is a launch error); the CPU op returns
  // the same empty [0, N].
  if (m == 0) return at::empty({0, a.n}, x.options());
  const PreparedWeight p = prepare(a, qweight, scales, qzeros);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, a.n}, x.options());
  if (path == CudaPath::kGemm) {
    run_gemm(p.w, xc, y, /*split_k=*/0);
    return y;
  }
  check_launch(groupwise_int::launch_gemv(p.w, xc.data_ptr(), y.data_ptr(), m,
                                          kernel_dtype(x.scalar_type(), "x"),
                                          c10::cuda::getCurrentCUDAStream()),
               "gemv");
  return y;
}

// Every expert's rows through its own weight. When no expert has more rows than a tile of the
// grouped GEMV (decode: a few tokens spread over many experts), one launch runs them all, reading
// the scales in their stored dtype; otherwise each expert with rows takes groupwise_int_mm's own
// path (fused GEMM or dequantize + cuBLAS), which reads its weight once instead of once per tile
// of 8 rows. The offsets are read on the host (check_grouped) and copied to the device.
at::Tensor grouped_mm_cuda(const at::Tensor& x, const at::Tensor& offsets,
                           const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& qzeros, int64_t bits,
                           int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(),
              "groupwise_int_grouped_mm: x must be on ", qweight.device(), ", got ", x.device());
  const GroupedArgs g =
      check_grouped(x, offsets, qweight, scales, qzeros, bits, group_size, "cuda");
  const GroupwiseIntArgs& a = g.weight;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, a.n}, x.options());
  if (rows == 0 || a.n == 0) return y;
  const bool one_launch =
      g.max_rows <= groupwise_int::kGroupedTileRows &&
      groupwise_int::grouped_gemv_grid_rows(rows, g.experts) <= groupwise_int::kGroupedMaxGridRows;
  if (!one_launch) {
    const at::Tensor off = offsets.contiguous();
    const int64_t* o = off.data_ptr<int64_t>();
    for (int64_t e = 0; e < g.experts; ++e) {
      const int64_t n_rows = o[e + 1] - o[e];
      if (n_rows == 0) continue;
      const c10::optional<at::Tensor> qz_e =
          qzeros.has_value() ? c10::optional<at::Tensor>((*qzeros)[e]) : c10::nullopt;
      y.narrow(0, o[e], n_rows)
          .copy_(mm_cuda(x.narrow(0, o[e], n_rows), qweight[e], scales[e], qz_e, bits,
                         group_size));
    }
    return y;
  }
  const at::Tensor qw = qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  at::Tensor qz;
  if (qzeros.has_value()) qz = qzeros->contiguous();
  const at::Tensor off = offsets.to(x.device());
  const at::Tensor xc = x.contiguous();
  groupwise_int::GroupedWeight w{};
  w.qweight = reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>());
  w.scales = sc.data_ptr();
  w.qzeros = qz.defined() ? reinterpret_cast<const uint32_t*>(qz.data_ptr<int32_t>()) : nullptr;
  w.scale_dtype = kernel_dtype(sc.scalar_type(), "scales");
  w.experts = g.experts;
  w.n = a.n;
  w.k = a.k;
  w.group_size = a.group_size;
  w.bits = static_cast<int>(a.bits);
  check_launch(groupwise_int::launch_grouped_gemv(w, off.data_ptr<int64_t>(), xc.data_ptr(),
                                                  y.data_ptr(), rows,
                                                  kernel_dtype(x.scalar_type(), "x"),
                                                  c10::cuda::getCurrentCUDAStream()),
               "grouped_gemv");
  return y;
}

// The fused GEMM alone, for any M >= 1, with split-K forced (split_k >= 1) or chosen by the
// heuristic (split_k == 0): lets tests and benchmarks reach every configuration.
at::Tensor gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size,
                     int64_t split_k) {
  TORCH_CHECK(x.dim() == 2, "groupwise_int_gemm_cuda: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && x.device() == qweight.device(),
              "groupwise_int_gemm_cuda: x must be on ", qweight.device(), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "groupwise_int_gemm_cuda: x must be fp16 or bf16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1, "groupwise_int_gemm_cuda: x must have at least one row");
  TORCH_CHECK(split_k >= 0, "groupwise_int_gemm_cuda: split_k must be >= 0, got ", split_k);
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, x.size(1), "cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(gemm_applies(x.scalar_type(), weight_shape(a.n, a.k, a.group_size, a.bits)),
              "groupwise_int_gemm_cuda: unsupported here (needs sm_80+ and a group size that is a "
              "multiple of 8 or per-channel), got group_size ", group_size);
  const PreparedWeight p = prepare(a, qweight, scales, qzeros);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), a.n}, x.options());
  run_gemm(p.w, xc, y, split_k);
  return y;
}

// Which CUDA path groupwise_int_mm takes for these arguments on the current device.
std::string cuda_path(int64_t m, int64_t out_features, int64_t in_features, int64_t bits,
                      int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(in_features > 0 && out_features > 0 && m >= 0,
              "groupwise_int_cuda_path: sizes must be positive");
  TORCH_CHECK(group_size == -1 || (group_size > 0 && in_features % group_size == 0),
              "groupwise_int_cuda_path: group_size ", group_size, " does not divide in_features ",
              in_features);
  return path_name(pick_path(m, dtype, weight_shape(out_features, in_features, group_size, bits)));
}


// ---- The mma kernel on repacked weights (cuda_mma.cu; layout: groupwise_int_mma_layout.py) ----

// The kernel's group size for a layer's: per-channel weights are one group over the padded K.
int64_t mma_kernel_group(int64_t group_size, int64_t in_features) {
  return group_size == -1 ? groupwise_int::mma_k_pad(in_features) : group_size;
}

groupwise_int::DType mma_scale_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16,
              "groupwise_int_mma_mm: scales must be fp16 or bf16, got ", t);
  return kernel_dtype(t, "scales");
}

void check_mma_shape(const at::Tensor& t, const char* name, at::ScalarType dtype,
                     std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == dtype, "groupwise_int_mma_mm: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "groupwise_int_mma_mm: ", name, " must be ",
              c10::IntArrayRef(shape), " (the layout of formats/groupwise_int_mma_layout.py), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "groupwise_int_mma_mm: ", name, " must be contiguous");
  // The kernel copies these tensors to shared memory with 16-byte cp.async: a view that starts
  // off a 16-byte boundary (a storage offset) would fault on the GPU instead of failing here.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "groupwise_int_mma_mm: ", name,
              " must start on a 16-byte boundary (the kernel reads it with 16-byte cp.async), got "
              "a view at storage offset ", t.storage_offset(), "; pass a .clone()");
}

at::Tensor mma_mm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                       int64_t in_features, int64_t out_features, int64_t split_k) {
  TORCH_CHECK(x.dim() == 2, "groupwise_int_mma_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "groupwise_int_mma_mm: x must be fp16 or bf16, got ", x.scalar_type());
  TORCH_CHECK(bits == 4 || bits == 8, "groupwise_int_mma_mm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0 && in_features % 8 == 0,
              "groupwise_int_mma_mm: in_features must be a positive multiple of 8, got ",
              in_features);
  TORCH_CHECK(out_features > 0, "groupwise_int_mma_mm: out_features must be positive, got ",
              out_features);
  TORCH_CHECK(x.size(1) == in_features, "groupwise_int_mma_mm: x must be [M, ", in_features,
              "], got ", x.sizes());
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 16 == 0 &&
                                   in_features % group_size == 0),
              "groupwise_int_mma_mm: group_size must be -1 or a multiple of 16 dividing "
              "in_features ", in_features, ", got ", group_size);
  TORCH_CHECK(split_k >= 0, "groupwise_int_mma_mm: split_k must be >= 0, got ", split_k);
  const int64_t kgroup = mma_kernel_group(group_size, in_features);
  const int64_t n_tiles = groupwise_int::mma_n_pad(out_features) / groupwise_int::kMmaTileN;
  const int64_t k16 = groupwise_int::mma_k_pad(in_features) / 16;
  const int64_t groups = groupwise_int::mma_groups(in_features, kgroup);
  check_mma_shape(qweight, "qweight", at::kInt, {k16, n_tiles, 32, bits});
  check_mma_shape(scales, "scales", scales.scalar_type(), {groups, n_tiles, 8, 8});
  if (zeros.has_value()) check_mma_shape(*zeros, "zeros", at::kInt, {groups, n_tiles, 8, bits / 4});
  TORCH_CHECK(x.is_cuda() && qweight.device() == x.device() && scales.device() == x.device() &&
                  (!zeros || zeros->device() == x.device()),
              "groupwise_int_mma_mm: x, qweight, scales and zeros must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(current_device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8,
              "groupwise_int_mma_mm: needs sm_80 or newer");
  groupwise_int::MmaWeight w{};
  w.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  w.scales = scales.data_ptr();
  w.zeros = zeros ? reinterpret_cast<const uint32_t*>(zeros->data_ptr<int32_t>()) : nullptr;
  w.scale_dtype = mma_scale_dtype(scales.scalar_type());
  w.n = out_features;
  w.k = in_features;
  w.group_size = kgroup;
  w.bits = static_cast<int>(bits);
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, out_features}, x.options());
  if (m == 0) return y;
  // 16-byte activation loads: a view that starts off a 16-byte boundary is copied.
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
  const groupwise_int::DType act = kernel_dtype(x.scalar_type(), "x");
  const int splits = groupwise_int::mma_resolve_splits(
      w, m, act, static_cast<int>(std::min<int64_t>(split_k, groupwise_int::kMmaMaxSplits)),
      current_device_attribute(cudaDevAttrMultiProcessorCount));
  const size_t bytes = groupwise_int::mma_workspace_bytes(w, m, splits);
  const int64_t n_counters = groupwise_int::mma_counter_count(w, m, splits);
  at::Tensor workspace, counters;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, x.options().dtype(at::kFloat));
    counters = at::zeros({n_counters}, x.options().dtype(at::kInt));
  }
  check_launch(groupwise_int::launch_mma(w, xc.data_ptr(), y.data_ptr(), m, act, splits,
                                         bytes > 0 ? workspace.data_ptr<float>() : nullptr,
                                         bytes > 0 ? counters.data_ptr<int32_t>() : nullptr,
                                         c10::cuda::getCurrentCUDAStream()),
               "mma");
  return y;
}

// The mma-layout repack on the GPU (cuda_mma_repack.cu); the same outputs as the CPU op.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mma_repack_cuda(
    const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros,
    int64_t bits, int64_t group_size, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  MmaRepackCall c =
      prepare_mma_repack(qweight, scales, qzeros, bits, group_size, in_features, "cuda");
  check_launch(groupwise_int::launch_mma_repack(c.source, c.extents, c.q_out(), c.s_out(),
                                                c.z_out(), c10::cuda::getCurrentCUDAStream()),
               "mma_repack");
  return {c.q, c.s, c.z};
}

// The split count groupwise_int_mma_mm runs for these arguments on the current device.
int64_t mma_splits(int64_t m, int64_t out_features, int64_t in_features, int64_t bits,
                   int64_t group_size, at::ScalarType scale_dtype, at::ScalarType act_dtype,
                   int64_t split_k) {
  TORCH_CHECK(m >= 1 && out_features > 0 && in_features > 0 && split_k >= 0,
              "groupwise_int_mma_splits: m, out_features, in_features must be positive and "
              "split_k >= 0");
  groupwise_int::MmaWeight w{};
  w.n = out_features;
  w.k = in_features;
  w.group_size = mma_kernel_group(group_size, in_features);
  w.bits = static_cast<int>(bits);
  w.scale_dtype = mma_scale_dtype(scale_dtype);
  TORCH_CHECK(groupwise_int::mma_supported(w.bits, w.k, w.group_size, w.scale_dtype),
              "groupwise_int_mma_splits: the mma kernel does not take this weight");
  return groupwise_int::mma_resolve_splits(
      w, m, kernel_dtype(act_dtype, "act_dtype"),
      static_cast<int>(std::min<int64_t>(split_k, groupwise_int::kMmaMaxSplits)),
      current_device_attribute(cudaDevAttrMultiProcessorCount));
}

}  // namespace
}  // namespace quantlab

// CUDA-only ops (they exist only in CUDA builds; tests skip when they are absent).
TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def(
      "groupwise_int_gemm_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
      "int group_size, int split_k) -> Tensor");
  m.def(
      "groupwise_int_cuda_path(int m, int out_features, int in_features, int bits, int group_size, "
      "ScalarType dtype) -> str",
      &quantlab::cuda_path);
  m.def(
      "groupwise_int_mma_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
      "int group_size, int in_features, int out_features, int split_k) -> Tensor");
  m.def(
      "groupwise_int_mma_splits(int m, int out_features, int in_features, int bits, "
      "int group_size, ScalarType scale_dtype, ScalarType act_dtype, int split_k) -> int",
      &quantlab::mma_splits);
}

TORCH_LIBRARY_IMPL(quantlab, CUDA, m) {
  m.impl("groupwise_int_dequant", &quantlab::dequant_cuda);
  m.impl("groupwise_int_mm", &quantlab::mm_cuda);
  m.impl("groupwise_int_gemm_cuda", &quantlab::gemm_cuda);
  m.impl("groupwise_int_mma_mm", &quantlab::mma_mm_cuda);
  m.impl("groupwise_int_mma_repack", &quantlab::mma_repack_cuda);
  m.impl("groupwise_int_grouped_mm", &quantlab::grouped_mm_cuda);
}
