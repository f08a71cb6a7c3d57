// torch bindings of the PVQ kernels: schemas, argument checks, CPU implementations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings/pvq_checks.h"
#include "pvq/cpu_kernels.h"

namespace quantlab {
namespace {

struct PreparedCpu {
  pvq::CpuParams p;
  at::Tensor codes, scales32, levels32;  // contiguous fp32 copies kept alive for the call
};

PreparedCpu prepare_cpu(const PvqArgs& a, const at::Tensor& codes, const at::Tensor& row_scales,
                        const at::Tensor& levels) {
  PreparedCpu c;
  c.codes = codes.contiguous();
  c.scales32 = row_scales.to(at::kFloat).contiguous();
  c.levels32 = levels.to(at::kFloat).contiguous();
  c.p.codes = reinterpret_cast<const uint32_t*>(c.codes.data_ptr<int32_t>());
  c.p.n_words = a.n_words;
  c.p.row_scales = c.scales32.data_ptr<float>();
  c.p.levels = c.levels32.data_ptr<float>();
  c.p.n_levels = a.levels;
  c.p.n = a.n;
  c.p.k = a.k;
  c.p.dim = a.dim;
  c.p.pulses = a.pulses;
  return c;
}

void check_codes(int64_t bad, int64_t levels) {
  TORCH_CHECK(bad == 0, "pvq: ", bad, " corrupt codes (amplitude level >= ", levels,
              "); the packed weight is damaged");
}

at::Tensor decode_cpu(const at::Tensor& codes, const at::Tensor& row_scales,
                      const at::Tensor& levels, int64_t dim, int64_t pulses, int64_t in_features,
                      at::ScalarType out_dtype) {
  const PvqArgs a = check_pvq(codes, row_scales, levels, dim, pulses, in_features, "cpu");
  const PreparedCpu c = prepare_cpu(a, codes, row_scales, levels);
  at::Tensor out = at::empty({a.n, a.k}, codes.options().dtype(at::kFloat));
  check_codes(pvq::decode_cpu(c.p, out.data_ptr<float>()), a.levels);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

at::Tensor mm_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scales,
                  const at::Tensor& levels, int64_t dim, int64_t pulses) {
  TORCH_CHECK(x.dim() == 2, "pvq_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "pvq_mm: x must be on the CPU, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "pvq_mm: x must be floating point, got ",
              x.scalar_type());
  const PvqArgs a = check_pvq(codes, row_scales, levels, dim, pulses, x.size(1), "cpu");
  const int64_t m = x.size(0);
  if (m > kPvqGemvMaxRows) {
    const at::Tensor w = decode_cpu(codes, row_scales, levels, dim, pulses, a.k, at::kFloat);
    return at::matmul(x.to(at::kFloat), w.t()).to(x.scalar_type());
  }
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const PreparedCpu c = prepare_cpu(a, codes, row_scales, levels);
  at::Tensor y = at::empty({m, a.n}, x32.options());
  check_codes(pvq::gemv_cpu(c.p, x32.data_ptr<float>(), m, y.data_ptr<float>()), a.levels);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::string cpu_path() { return pvq::gemv_cpu_path(); }

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def(
      "pvq_decode(Tensor codes, Tensor row_scales, Tensor levels, int dim, int pulses, "
      "int in_features, ScalarType out_dtype) -> Tensor");
  m.def(
      "pvq_mm(Tensor x, Tensor codes, Tensor row_scales, Tensor levels, int dim, int pulses) "
      "-> Tensor");
  m.def("pvq_cpu_path() -> str", &quantlab::cpu_path);
}

TORCH_LIBRARY_IMPL(quantlab, CPU, m) {
  m.impl("pvq_decode", &quantlab::decode_cpu);
  m.impl("pvq_mm", &quantlab::mm_cpu);
}
