// torch bindings of the BitStack kernels: schemas, argument checks, CPU implementations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "bindings/bitstack_checks.h"
#include "bitstack/cpu_kernels.h"

namespace quantlab {
namespace {

// Weights rebuilt at a time on the many-rows CPU path (one row tile, ~4 MB of fp32).
constexpr int64_t kTileWeights = int64_t{1} << 20;

struct CpuWeight {
  bitstack::CpuParams p;
  at::Tensor signs, u32, v32;  // keep the contiguous copies alive during the call
};

CpuWeight prepare(const BitStackArgs& a, const at::Tensor& signs, const at::Tensor& u,
                  const at::Tensor& v) {
  CpuWeight w;
  w.signs = signs.contiguous();
  w.u32 = u.to(at::kFloat).contiguous();
  w.v32 = v.to(at::kFloat).contiguous();
  w.p.signs = w.signs.data_ptr<uint8_t>();
  w.p.u = w.u32.data_ptr<float>();
  w.p.v = w.v32.data_ptr<float>();
  w.p.blocks = a.blocks;
  w.p.n = a.n;
  w.p.k = a.k;
  w.p.rank = a.rank;
  return w;
}

at::Tensor dequant_cpu(const at::Tensor& signs, const at::Tensor& u, const at::Tensor& v,
                       int64_t in_features, at::ScalarType out_dtype) {
  const BitStackArgs a = check_bitstack(signs, u, v, in_features, "cpu");
  const CpuWeight w = prepare(a, signs, u, v);
  at::Tensor out = at::empty({a.n, a.k}, signs.options().dtype(at::kFloat));
  bitstack::dequant_rows_cpu(w.p, 0, a.n, out.data_ptr<float>());
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

at::Tensor mm_cpu(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& u,
                  const at::Tensor& v) {
  TORCH_CHECK(x.dim() == 2, "bitstack_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "bitstack_mm: x must be on the CPU, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bitstack_mm: x must be floating point, got ",
              x.scalar_type());
  const BitStackArgs a = check_bitstack(signs, u, v, x.size(1), "cpu");
  const int64_t m = x.size(0);
  const CpuWeight w = prepare(a, signs, u, v);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, a.n}, x32.options());
  if (m == 0) return y.to(x.scalar_type());
  if (m <= bitstack::kLutMaxRows) {
    bitstack::gemv_cpu(w.p, x32.data_ptr<float>(), m, y.data_ptr<float>());
  } else {
    // Compute-bound: rebuild a tile of output rows (never the whole weight) and let BLAS
    // multiply it; the rebuild costs B * r per weight once for all M rows.
    const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(a.n, kTileWeights / a.k));
    at::Tensor tile = at::empty({rows, a.k}, x32.options());
    for (int64_t r0 = 0; r0 < a.n; r0 += rows) {
      const int64_t r1 = std::min(a.n, r0 + rows);
      bitstack::dequant_rows_cpu(w.p, r0, r1, tile.data_ptr<float>());
      y.narrow(1, r0, r1 - r0).copy_(at::matmul(x32, tile.narrow(0, 0, r1 - r0).t()));
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::string cpu_path(int64_t m, int64_t rank) {
  TORCH_CHECK(m >= 0 && rank >= 1, "bitstack_cpu_path: m must be >= 0 and rank >= 1");
  if (m > bitstack::kLutMaxRows) return "tiled-gemm";
  return bitstack::gemv_cpu_path(rank);
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def(
      "bitstack_dequant(Tensor signs, Tensor u, Tensor v, int in_features, "
      "ScalarType out_dtype) -> Tensor");
  m.def("bitstack_mm(Tensor x, Tensor signs, Tensor u, Tensor v) -> Tensor");
  m.def("bitstack_cpu_path(int m, int rank) -> str", &quantlab::cpu_path);
}

TORCH_LIBRARY_IMPL(quantlab, CPU, m) {
  m.impl("bitstack_dequant", &quantlab::dequant_cpu);
  m.impl("bitstack_mm", &quantlab::mm_cpu);
}
