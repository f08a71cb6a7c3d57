// torch bindings of the groupwise integer kernels: schemas, argument checks, CPU implementations.
// This directory is the only part of csrc/ that includes torch headers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings/groupwise_int_checks.h"
#include "groupwise_int/cpu_kernels.h"
#include "groupwise_int/mma_repack.h"

namespace quantlab {
namespace {

// Above kGemvMaxRows rows the kernel runs in chunks of 8 rows, re-reading the packed weight per
// chunk, while dequantize + GEMM pays once for writing the dense fp32 weight, mostly first-touch
// page faults of its fresh allocation (~1.5-2 ns per weight). Measured on 2 cores (AVX-512 and
// AVX2 paths, 4-bit, docs/benchmarks.md): for 4096 x 4096 and 4096 x 14336 the chunks win up to
// 32 rows on both ISAs (4096 x 14336 g128, M = 32: 54 / 111 ms vs 131 ms; M = 48 loses on AVX2),
// for SmolLM2's 1536 x 576 dequantize + GEMM already wins at 12 rows (0.27 vs 0.33 ms).
constexpr int64_t kChunkedGemvMaxRows = 32;
constexpr int64_t kChunkedGemvMinWeights = int64_t{1} << 22;

bool cpu_gemv_takes(int64_t m, int64_t weights) {
  return m <= kGemvMaxRows || (m <= kChunkedGemvMaxRows && weights >= kChunkedGemvMinWeights);
}

groupwise_int::CpuParams cpu_params(const GroupwiseIntArgs& a, const at::Tensor& qweight,
                                    const at::Tensor& scales32,
                                    const c10::optional<at::Tensor>& qzeros) {
  groupwise_int::CpuParams p{};
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.scales = scales32.data_ptr<float>();
  p.qzeros = qzeros.has_value() ? reinterpret_cast<const uint32_t*>(qzeros->data_ptr<int32_t>())
                                : nullptr;
  p.n = a.n;
  p.k = a.k;
  p.group_size = a.group_size;
  p.bits = static_cast<int>(a.bits);
  return p;
}

at::Tensor dequant_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size,
                       int64_t in_features, at::ScalarType out_dtype) {
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, in_features, "cpu");
  const at::Tensor qw = qweight.contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> qz =
      qzeros.has_value() ? c10::optional<at::Tensor>(qzeros->contiguous()) : c10::nullopt;
  at::Tensor out = at::empty({a.n, a.k}, qweight.options().dtype(at::kFloat));
  // The kernel threads over rows itself (OpenMP, the runtime torch uses).
  groupwise_int::dequant_cpu(cpu_params(a, qw, s32, qz), out.data_ptr<float>());
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

at::Tensor mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& qzeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "groupwise_int_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "groupwise_int_mm: x must be on the CPU, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "groupwise_int_mm: x must be floating point, got ", x.scalar_type());
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, x.size(1), "cpu");
  const int64_t m = x.size(0);
  if (!cpu_gemv_takes(m, a.n * a.k)) {
    const at::Tensor w = dequant_cpu(qweight, scales, qzeros, bits, group_size, a.k, at::kFloat);
    return at::matmul(x.to(at::kFloat), w.t()).to(x.scalar_type());
  }
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> qz =
      qzeros.has_value() ? c10::optional<at::Tensor>(qzeros->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty({m, a.n}, x32.options());
  groupwise_int::gemv_cpu(cpu_params(a, qw, s32, qz), x32.data_ptr<float>(), m,
                          y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Every expert's rows through its own weight in one call: gemv_cpu for the experts whose rows
// it takes (each expert's scales converted to fp32 alone, so a call touches only the experts it
// uses), dequantize + GEMM for the others, each written straight into its rows of y. Per expert
// the result is what groupwise_int_mm gives on that expert's rows.
at::Tensor grouped_mm_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& qweight,
                          const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros,
                          int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu(), "groupwise_int_grouped_mm: x must be on the CPU, got ",
              x.device());
  const GroupedArgs g = check_grouped(x, offsets, qweight, scales, qzeros, bits, group_size, "cpu");
  const GroupwiseIntArgs& a = g.weight;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous();
  const c10::optional<at::Tensor> qz =
      qzeros.has_value() ? c10::optional<at::Tensor>(qzeros->contiguous()) : c10::nullopt;
  const at::Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  at::Tensor y = at::empty({x.size(0), a.n}, x32.options());
  for (int64_t e = 0; e < g.experts; ++e) {
    const int64_t rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    const at::Tensor qw_e = qw[e];
    const at::Tensor s_e = scales[e].to(at::kFloat).contiguous();
    const c10::optional<at::Tensor> qz_e =
        qz.has_value() ? c10::optional<at::Tensor>((*qz)[e]) : c10::nullopt;
    if (cpu_gemv_takes(rows, a.n * a.k)) {
      groupwise_int::gemv_cpu(cpu_params(a, qw_e, s_e, qz_e), x32.data_ptr<float>() + o[e] * a.k,
                              rows, y.data_ptr<float>() + o[e] * a.n);
    } else {
      const at::Tensor w = dequant_cpu(qw_e, s_e, qz_e, bits, group_size, a.k, at::kFloat);
      at::Tensor y_e = y.narrow(0, o[e], rows);
      at::mm_out(y_e, x32.narrow(0, o[e], rows), w.t());
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The mma-layout repack (csrc/groupwise_int/mma_repack.h): (qweight, scales, zeros), zeros empty
// when symmetric.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mma_repack_cpu(
    const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros,
    int64_t bits, int64_t group_size, int64_t in_features) {
  MmaRepackCall c =
      prepare_mma_repack(qweight, scales, qzeros, bits, group_size, in_features, "cpu");
  groupwise_int::mma_repack::repack_cpu(c.source, c.extents, c.q_out(), c.s_out(), c.z_out());
  return {c.q, c.s, c.z};
}

std::string cpu_path(int64_t bits, int64_t group_size, int64_t in_features) {
  groupwise_int::CpuParams p{};
  p.bits = static_cast<int>(bits);
  p.k = in_features;
  p.group_size = group_size == -1 ? in_features : group_size;
  return groupwise_int::gemv_cpu_path(p);
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def(
      "groupwise_int_dequant(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
      "int group_size, int in_features, ScalarType out_dtype) -> Tensor");
  m.def(
      "groupwise_int_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
      "int group_size) -> Tensor");
  m.def(
      "groupwise_int_mma_repack(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, "
      "int group_size, int in_features) -> (Tensor, Tensor, Tensor)");
  m.def(
      "groupwise_int_grouped_mm(Tensor x, Tensor offsets, Tensor qweight, Tensor scales, "
      "Tensor? qzeros, int bits, int group_size) -> Tensor");
  m.def("groupwise_int_cpu_path(int bits, int group_size, int in_features) -> str",
        &quantlab::cpu_path);
}

TORCH_LIBRARY_IMPL(quantlab, CPU, m) {
  m.impl("groupwise_int_dequant", &quantlab::dequant_cpu);
  m.impl("groupwise_int_mm", &quantlab::mm_cpu);
  m.impl("groupwise_int_mma_repack", &quantlab::mma_repack_cpu);
  m.impl("groupwise_int_grouped_mm", &quantlab::grouped_mm_cpu);
}
