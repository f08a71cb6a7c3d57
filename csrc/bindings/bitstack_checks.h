// Argument checks shared by the BitStack CPU and CUDA bindings; every message names the argument.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace quantlab {

struct BitStackArgs {
  int64_t blocks;
  int64_t n;     // out_features
  int64_t k;     // in_features
  int64_t rank;
};

inline BitStackArgs check_bitstack(const at::Tensor& signs, const at::Tensor& u,
                                   const at::Tensor& v, int64_t in_features, const char* device) {
  TORCH_CHECK(in_features > 0, "bitstack: in_features must be positive, got ", in_features);
  TORCH_CHECK(signs.scalar_type() == at::kByte, "bitstack: signs must be uint8, got ",
              signs.scalar_type());
  TORCH_CHECK(signs.dim() == 3, "bitstack: signs must be 3-D [B, N, ceil(K/8)], got ",
              signs.sizes());
  const int64_t blocks = signs.size(0);
  const int64_t n = signs.size(1);
  TORCH_CHECK(blocks >= 1, "bitstack: signs must hold at least one block");
  TORCH_CHECK(signs.size(2) == (in_features + 7) / 8, "bitstack: signs must be [", blocks, ", ", n,
              ", ", (in_features + 7) / 8, "] for in_features ", in_features, ", got ",
              signs.sizes());
  TORCH_CHECK(u.dim() == 3 && u.size(0) == blocks && u.size(1) == n,
              "bitstack: u must be [", blocks, ", ", n, ", r], got ", u.sizes());
  const int64_t rank = u.size(2);
  TORCH_CHECK(rank >= 1, "bitstack: rank must be >= 1");
  TORCH_CHECK(v.dim() == 3 && v.size(0) == blocks && v.size(1) == rank && v.size(2) == in_features,
              "bitstack: v must be [", blocks, ", ", rank, ", ", in_features, "], got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(u.scalar_type()) && at::isFloatingType(v.scalar_type()),
              "bitstack: u and v must be floating point, got ", u.scalar_type(), " and ",
              v.scalar_type());
  const bool want_cuda = std::string(device) == "cuda";
  auto on_device = [&](const at::Tensor& t) { return want_cuda ? t.is_cuda() : t.is_cpu(); };
  TORCH_CHECK(on_device(signs) && on_device(u) && on_device(v),
              "bitstack: signs, u and v must all be on the ", device);
  TORCH_CHECK(signs.device() == u.device() && u.device() == v.device(),
              "bitstack: signs, u and v must be on one device");
  return {blocks, n, in_features, rank};
}

}  // namespace quantlab
