// torch bindings of the ternary kernels: schemas, argument checks, CPU implementations.
// Argument errors raise ValueError (TORCH_CHECK_VALUE), like the Python reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "ternary/cpu_kernels.h"

namespace quantlab {
namespace {

// Batches up to this size take the table-lookup kernel; larger ones quantize the activations the
// same way, dequantize the weight once and run the BLAS GEMM (the LUT work grows with every row
// of x, the GEMM's cost per row falls; they cross near here on AVX2 machines, see
// docs/methods/ternary.md).
constexpr int64_t kLutMaxRows = 16;

int64_t scale_columns(int64_t k, int64_t group_size) {
  return group_size > 0 ? k / group_size : 1;
}

void check_granularity(int64_t n, int64_t k, int64_t group_size, const at::Tensor& lut_scales,
                       const char* op) {
  TORCH_CHECK_VALUE(n > 0 && k > 0, op, ": out_features and in_features must be positive, got ",
                    n, " and ", k);
  TORCH_CHECK_VALUE(
      group_size == ternary::kPerTensor || group_size == ternary::kPerRow ||
          (group_size > 0 && k % group_size == 0 && group_size % 8 == 0),
      op, ": group_size must be 0 (per tensor), -1 (per row) or a multiple of 8 dividing "
      "in_features ", k, ", got ", group_size);
  // The LUT scale layout (quantlab.formats.ternary_packing.lut_pack_scales).
  const bool tensor = group_size == ternary::kPerTensor;
  const int64_t tiles = tensor ? 1 : ternary::lut_tiles(n);
  const int64_t cols = scale_columns(k, group_size);
  const int64_t rows = tensor ? 1 : ternary::kTileRows;
  TORCH_CHECK_VALUE(lut_scales.dim() == 3 && lut_scales.size(0) == tiles &&
                        lut_scales.size(1) == cols && lut_scales.size(2) == rows,
                    op, ": lut_scales must be [", tiles, ", ", cols, ", ", rows,
                    "] (quantlab.ops.ternary.lut_scales) for group_size ", group_size, ", got ",
                    lut_scales.sizes());
  TORCH_CHECK_VALUE(lut_scales.scalar_type() == at::kFloat, op, ": lut_scales must be float32, got ",
                    lut_scales.scalar_type());
  TORCH_CHECK_VALUE(lut_scales.device().is_cpu(), op, ": lut_scales must be on the CPU, got ",
                    lut_scales.device());
}

void check_lut(const at::Tensor& lut, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK_VALUE(lut.scalar_type() == at::kByte, op, ": lut must be uint8, got ",
                    lut.scalar_type());
  TORCH_CHECK_VALUE(lut.device().is_cpu(), op, ": lut must be on the CPU, got ", lut.device());
  TORCH_CHECK_VALUE(lut.dim() == 3 && lut.size(0) == ternary::lut_tiles(n) &&
                        lut.size(1) == ternary::lut_pairs(k) && lut.size(2) == 32,
                    op, ": lut must be [", ternary::lut_tiles(n), ", ", ternary::lut_pairs(k),
                    ", 32] for a [", n, ", ", k, "] weight, got ", lut.sizes());
}

ternary::LutParams lut_params(const at::Tensor& lut, const at::Tensor& scales32, int64_t n,
                              int64_t k, int64_t group_size) {
  ternary::LutParams p{};
  p.lut = lut.data_ptr<uint8_t>();
  p.scales = scales32.data_ptr<float>();
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  return p;
}

at::Tensor lut_pack_cpu(const at::Tensor& qweight, c10::string_view packing, int64_t out_features,
                        int64_t in_features) {
  TORCH_CHECK_VALUE(packing == "i2" || packing == "tq1",
                    "ternary_lut_pack: packing must be 'i2' or 'tq1', got '", std::string(packing),
                    "'");
  TORCH_CHECK_VALUE(out_features > 0 && in_features > 0,
                    "ternary_lut_pack: out_features and in_features must be positive");
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                        qweight.device().is_cpu(),
                    "ternary_lut_pack: qweight must be a 2-D uint8 CPU tensor, got ",
                    qweight.scalar_type(), " ", qweight.sizes(), " on ", qweight.device());
  const bool i2 = packing == "i2";
  const int64_t need = i2 ? (in_features + 3) / 4 : (in_features + 4) / 5;
  TORCH_CHECK_VALUE(qweight.size(0) == out_features && (i2 ? qweight.size(1) >= need
                                                           : qweight.size(1) == need),
                    "ternary_lut_pack: qweight must be [", out_features, ", ", need,
                    i2 ? "+" : "", "] for ", std::string(packing), " with in_features ",
                    in_features, ", got ", qweight.sizes());
  const at::Tensor q = qweight.contiguous();
  at::Tensor lut = at::empty({ternary::lut_tiles(out_features), ternary::lut_pairs(in_features), 32},
                             q.options());
  const int64_t invalid = ternary::lut_pack_cpu(q.data_ptr<uint8_t>(), q.size(1), i2 ? 0 : 1,
                                                out_features, in_features, lut.data_ptr<uint8_t>());
  TORCH_CHECK_VALUE(invalid == 0, "corrupt ", std::string(packing), " weights: ", invalid,
                    i2 ? " entries hold the invalid code 3" : " bytes are not valid trit codes");
  return lut;
}

at::Tensor lut_mm_cpu(const at::Tensor& x, const at::Tensor& lut, const at::Tensor& lut_scales,
                      int64_t out_features, int64_t in_features, int64_t group_size) {
  const char* op = "ternary_lut_mm";
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_features, op, ": x must be [M, ",
                    in_features, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                    x.scalar_type());
  check_granularity(out_features, in_features, group_size, lut_scales, op);
  check_lut(lut, out_features, in_features, op);
  const int64_t m = x.size(0);
  if (m == 0) return at::empty({0, out_features}, x.options());
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor lutc = lut.contiguous();
  const at::Tensor s32 = lut_scales.contiguous();
  if (m > kLutMaxRows) {
    // Same arithmetic as the LUT kernel: int8 activations times exact trits, summed in fp32 by
    // the GEMM (exact for per-tensor / per-row scales: integer sums below 2^24), then scaled.
    const int64_t kp = 8 * ternary::lut_pairs(in_features);
    at::Tensor xq = at::empty({m, kp}, x.options().dtype(at::kChar));
    at::Tensor inv = at::empty({m}, x32.options());
    ternary::quantize_activations(x32.data_ptr<float>(), m, in_features, kp,
                                  xq.data_ptr<int8_t>(), inv.data_ptr<float>());
    const bool grouped = group_size > 0;
    const at::Tensor unit = at::ones({1, 1}, x32.options());
    at::Tensor w = at::empty({out_features, in_features}, x32.options());
    ternary::lut_dequant_cpu(
        lut_params(lutc, grouped ? s32 : unit, out_features, in_features,
                   grouped ? group_size : ternary::kPerTensor),
        w.data_ptr<float>());
    at::Tensor y = at::matmul(xq.narrow(1, 0, in_features).to(at::kFloat), w.t());
    if (!grouped) {
      y = y * (group_size == ternary::kPerRow ? s32.view({1, -1}).narrow(1, 0, out_features)
                                              : s32.view({1, 1}));
    }
    y = y / inv.unsqueeze(1);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::Tensor y = at::empty({m, out_features}, x32.options());
  ternary::lut_mm_cpu(lut_params(lutc, s32, out_features, in_features, group_size),
                      x32.data_ptr<float>(), m, y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::string cpu_path(int64_t m, int64_t out_features, int64_t in_features, int64_t group_size) {
  (void)out_features;
  (void)in_features;
  (void)group_size;
  if (m > kLutMaxRows) return "dequant-matmul";
  return std::string("lut-") + ternary::lut_mm_cpu_path();
}

}  // namespace
}  // namespace quantlab

TORCH_LIBRARY_FRAGMENT(quantlab, m) {
  m.def(
      "ternary_dequant(Tensor qweight, Tensor scales, str packing, int in_features, "
      "int group_size, ScalarType out_dtype) -> Tensor");
  m.def(
      "ternary_mm(Tensor x, Tensor qweight, Tensor scales, str packing, int in_features, "
      "int group_size) -> Tensor");
  m.def(
      "ternary_lut_pack(Tensor qweight, str packing, int out_features, int in_features) -> Tensor");
  m.def(
      "ternary_lut_mm(Tensor x, Tensor lut, Tensor lut_scales, int out_features, "
      "int in_features, int group_size) -> Tensor");
  m.def("ternary_cpu_path(int m, int out_features, int in_features, int group_size) -> str",
        &quantlab::cpu_path);
}

TORCH_LIBRARY_IMPL(quantlab, CPU, m) {
  m.impl("ternary_lut_pack", &quantlab::lut_pack_cpu);
  m.impl("ternary_lut_mm", &quantlab::lut_mm_cpu);
}
