// torch bindings of the groupwise integer kernels: schemas, argument checks, CPU implementations.
// This directory is the only part of csrc/ that includes torch headers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings/groupwise_int_checks.h"
#include "groupwise_int/cpu_kernels.h"

namespace quantlab {
namespace {

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
  if (m > kGemvMaxRows) {
    // Past a few rows the matmul is compute-bound: dequantize once and use the BLAS GEMM.
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
  m.def("groupwise_int_cpu_path(int bits, int group_size, int in_features) -> str",
        &quantlab::cpu_path);
}

TORCH_LIBRARY_IMPL(quantlab, CPU, m) {
  m.impl("groupwise_int_dequant", &quantlab::dequant_cpu);
  m.impl("groupwise_int_mm", &quantlab::mm_cpu);
}
