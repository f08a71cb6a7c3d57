// Argument checks shared by the CPU and CUDA bindings; every message names the argument.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "common/bitstream.h"
#include "groupwise_int/mma_repack.h"

namespace quantlab {

// Rows of x the GEMV kernels take at once (the CPU binding chunks larger batches of large weights,
// see groupwise_int.cpp; the rest go through dequantize + GEMM).
constexpr int64_t kGemvMaxRows = 8;

struct GroupwiseIntArgs {
  int64_t n;           // out_features
  int64_t k;           // in_features
  int64_t group_size;  // effective (K for per-channel)
  int64_t groups;
  int64_t bits;
};

inline GroupwiseIntArgs check_groupwise_int(const at::Tensor& qweight, const at::Tensor& scales,
                                            const c10::optional<at::Tensor>& qzeros, int64_t bits,
                                            int64_t group_size, int64_t in_features,
                                            const char* device) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "groupwise_int: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0, "groupwise_int: in_features must be positive, got ", in_features);
  TORCH_CHECK(group_size == -1 || group_size > 0,
              "groupwise_int: group_size must be -1 (per-channel) or positive, got ", group_size);
  const int64_t gs = group_size == -1 ? in_features : group_size;
  TORCH_CHECK(in_features % gs == 0, "groupwise_int: group_size ", group_size,
              " does not divide in_features ", in_features);
  const int64_t groups = in_features / gs;
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "groupwise_int: qweight must be int32, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, "groupwise_int: qweight must be 2-D [N, words], got ",
              qweight.sizes());
  const int64_t n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == packed_words(in_features, static_cast<int>(bits)),
              "groupwise_int: qweight must be [N, ", packed_words(in_features, static_cast<int>(bits)),
              "] for in_features ", in_features, " at ", bits, " bits, got ", qweight.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups,
              "groupwise_int: scales must be [", n, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()),
              "groupwise_int: scales must be floating point, got ", scales.scalar_type());
  if (qzeros.has_value()) {
    const at::Tensor& z = *qzeros;
    TORCH_CHECK(z.scalar_type() == at::kInt, "groupwise_int: qzeros must be int32, got ",
                z.scalar_type());
    TORCH_CHECK(z.dim() == 2 && z.size(0) == n &&
                    z.size(1) == packed_words(groups, static_cast<int>(bits)),
                "groupwise_int: qzeros must be [", n, ", ",
                packed_words(groups, static_cast<int>(bits)), "], got ", z.sizes());
  }
  const bool want_cuda = std::string(device) == "cuda";
  auto on_device = [&](const at::Tensor& t) { return want_cuda ? t.is_cuda() : t.is_cpu(); };
  TORCH_CHECK(on_device(qweight) && on_device(scales) && (!qzeros || on_device(*qzeros)),
              "groupwise_int: qweight, scales and qzeros must all be on the ", device);
  return {n, in_features, gs, groups, bits};
}

// The stacked experts of groupwise_int_grouped_mm: qweight [E, N, words_k], scales [E, N, G],
// qzeros [E, N, words_g] or none, each expert's slice checked as every groupwise_int op checks a
// weight; offsets a CPU int64 [E + 1] from 0, nondecreasing, to x's row count (read on the host,
// so a bad one is an error here, never an out-of-bounds read in a kernel).
struct GroupedArgs {
  GroupwiseIntArgs weight;  // one expert's
  int64_t experts;
  int64_t max_rows;  // most rows any expert gets
};

inline GroupedArgs check_grouped(const at::Tensor& x, const at::Tensor& offsets,
                                 const at::Tensor& qweight, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& qzeros, int64_t bits,
                                 int64_t group_size, const char* device) {
  TORCH_CHECK(x.dim() == 2, "groupwise_int_grouped_mm: x must be 2-D [R, K], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "groupwise_int_grouped_mm: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(qweight.dim() == 3 && scales.dim() == 3 && (!qzeros || qzeros->dim() == 3),
              "groupwise_int_grouped_mm: qweight, scales and qzeros must be stacked 3-D "
              "[E, N, ...], got qweight ", qweight.sizes(), " and scales ", scales.sizes());
  const int64_t experts = qweight.size(0);
  TORCH_CHECK(experts >= 1, "groupwise_int_grouped_mm: no experts");
  TORCH_CHECK(scales.size(0) == experts && (!qzeros || qzeros->size(0) == experts),
              "groupwise_int_grouped_mm: qweight, scales and qzeros must hold the same number of "
              "experts, got ", experts, " and ", scales.size(0));
  const c10::optional<at::Tensor> z0 =
      qzeros ? c10::optional<at::Tensor>((*qzeros)[0]) : c10::nullopt;
  GroupedArgs g{check_groupwise_int(qweight[0], scales[0], z0, bits, group_size, x.size(1), device),
                experts, 0};
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong &&
                  offsets.dim() == 1 && offsets.size(0) == experts + 1,
              "groupwise_int_grouped_mm: offsets must be a CPU int64 tensor of experts + 1 = ",
              experts + 1, " entries, got ", offsets.scalar_type(), " ", offsets.sizes(), " on ",
              offsets.device());
  const at::Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[experts] == x.size(0), "groupwise_int_grouped_mm: offsets must run "
              "from 0 to x's ", x.size(0), " rows, got ", o[0], " .. ", o[experts]);
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(o[e + 1] >= o[e], "groupwise_int_grouped_mm: offsets must be nondecreasing, got ",
                o[e], " then ", o[e + 1], " at expert ", e);
    g.max_rows = std::max(g.max_rows, o[e + 1] - o[e]);
  }
  return g;
}

// One call of the repack into the mma layout, prepared for either device: the exported tensors
// checked as every groupwise_int op checks them plus what the layout needs (4/8 bits, fp16/bf16
// scales, K % 8 == 0, a group size that is a multiple of 16), contiguous copies of them (alive
// for the launch), the source view and repacked extents of mma_repack.h, and the outputs
// allocated on the inputs' device (zeros: an empty int32 tensor when symmetric, since an op
// cannot return None).
struct MmaRepackCall {
  groupwise_int::mma_repack::Source source;
  groupwise_int::mma_repack::Extents extents;
  at::Tensor qweight, scales, qzeros;  // inputs (qzeros undefined when symmetric)
  at::Tensor q, s, z;                  // outputs
  uint32_t* q_out() { return reinterpret_cast<uint32_t*>(q.data_ptr<int32_t>()); }
  uint16_t* s_out() { return reinterpret_cast<uint16_t*>(s.data_ptr()); }
  uint32_t* z_out() {
    return qzeros.defined() ? reinterpret_cast<uint32_t*>(z.data_ptr<int32_t>()) : nullptr;
  }
};

inline MmaRepackCall prepare_mma_repack(const at::Tensor& qweight, const at::Tensor& scales,
                                        const c10::optional<at::Tensor>& qzeros, int64_t bits,
                                        int64_t group_size, int64_t in_features,
                                        const char* device) {
  const GroupwiseIntArgs a =
      check_groupwise_int(qweight, scales, qzeros, bits, group_size, in_features, device);
  TORCH_CHECK(bits == 4 || bits == 8, "groupwise_int_mma_repack: the mma layout takes 4- or "
              "8-bit codes, got ", bits);
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16,
              "groupwise_int_mma_repack: the mma layout takes fp16 or bf16 scales, got ",
              scales.scalar_type());
  TORCH_CHECK(in_features % 8 == 0, "groupwise_int_mma_repack: in_features must be a multiple "
              "of 8, got ", in_features);
  TORCH_CHECK(group_size == -1 || group_size % 16 == 0, "groupwise_int_mma_repack: group_size "
              "must be -1 or a multiple of 16, got ", group_size);
  namespace ml = groupwise_int::mma_layout;
  MmaRepackCall c;
  c.qweight = qweight.contiguous();
  c.scales = scales.contiguous();
  if (qzeros.has_value()) c.qzeros = qzeros->contiguous();
  c.source.qweight = reinterpret_cast<const uint32_t*>(c.qweight.data_ptr<int32_t>());
  c.source.scales = reinterpret_cast<const uint16_t*>(c.scales.data_ptr());
  c.source.qzeros =
      c.qzeros.defined() ? reinterpret_cast<const uint32_t*>(c.qzeros.data_ptr<int32_t>()) : nullptr;
  c.source.n = a.n;
  c.source.k = a.k;
  c.source.groups = a.groups;
  c.source.q_row_words = qweight.size(1);
  c.source.z_row_words = c.qzeros.defined() ? c.qzeros.size(1) : 0;
  c.source.bits = static_cast<int>(bits);
  const int64_t kernel_group = group_size == -1 ? ml::k_pad(in_features) : group_size;
  c.extents.k16 = ml::k_pad(a.k) / ml::kTileK;
  c.extents.n_tiles = ml::n_pad(a.n) / ml::kTileN;
  c.extents.groups = ml::kernel_groups(a.k, kernel_group);
  const auto& e = c.extents;
  const auto ints = qweight.options().dtype(at::kInt);
  c.q = at::empty({e.k16, e.n_tiles, 32, bits}, ints);
  c.s = at::empty({e.groups, e.n_tiles, 8, 8}, scales.options());
  c.z = c.qzeros.defined() ? at::empty({e.groups, e.n_tiles, 8, bits / 4}, ints)
                           : at::empty({0}, ints);
  return c;
}

}  // namespace quantlab
