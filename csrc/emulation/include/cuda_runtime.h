// The CPU emulation's <cuda_runtime.h>: CUDA's keywords, built-in variables, the runtime calls the
// kernel families' host launchers make, and the device built-ins their kernels use, each with
// the semantics the CUDA C++ Programming Guide documents (see docs/emulation.md for what is
// modelled and what is not). Only the emulation build puts this directory on the include path.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "quantlab_emu_math.h"
#include "quantlab_emu_runtime.h"
#include "quantlab_emu_vector_types.h"

#define QUANTLAB_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// scripts/build_emulation.py rewrites every __shared__ declaration into the runtime's per-CTA
// storage before compiling; one left over is a build error, not silently per-thread storage.
#define __shared__ _Pragma("GCC error \"__shared__ left untransformed (build through scripts/build_emulation.py)\"")

// ---- Runtime API ---------------------------------------------------------------------------

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorMisalignedAddress = 716;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

inline cudaError_t cudaGetLastError() { return quantlab_emu::last_error_and_reset(); }
inline cudaError_t cudaPeekAtLastError() { return quantlab_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    default: return "unknown error";
  }
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = quantlab_emu::kSmCount; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(quantlab_emu::kMaxDynamicSmemOptIn);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return quantlab_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}
// The occupancy rule of an sm_90 SM (threads, blocks and shared memory per SM; 1 KB of shared
// memory reserved per block); registers are not modelled.
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(P...),
                                                          int block_size, size_t dynamic_smem) {
  using namespace quantlab_emu;
  if (block_size <= 0 || block_size > kMaxThreadsPerBlock) return cudaErrorInvalidValue;
  int n = kMaxBlocksPerSm < kMaxThreadsPerSm / block_size ? kMaxBlocksPerSm
                                                          : kMaxThreadsPerSm / block_size;
  const int by_smem = static_cast<int>(kSmemPerSm / (dynamic_smem + 1024));
  *blocks = n < by_smem ? n : by_smem;
  return cudaSuccess;
}

namespace quantlab_emu {

// QUANTLAB_LAUNCH(grid, block, smem, stream, kernel)(args...) (csrc/common/cuda_launch.cuh):
// every thread calls the kernel with its own copy of the arguments, converted to the kernel's
// parameter types as a real launch converts them. Launches are synchronous (one stream).
template <typename... P>
struct BoundLaunch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    using Params = std::tuple<std::decay_t<P>...>;
    struct Closure {
      void (*kernel)(P...);
      Params params;
    } closure{kernel, Params(std::forward<A>(args)...)};
    auto body = [](void* c) {
      auto* cl = static_cast<Closure*>(c);
      Params copy = cl->params;  // the thread's own parameter copy
      std::apply(cl->kernel, copy);
    };
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, body, &closure);
  }
};

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  LaunchConfig(dim3 g, dim3 b, size_t s, cudaStream_t) : grid(g), block(b), smem(s) {}
  template <typename... P>
  BoundLaunch<P...> kernel(void (*k)(P...)) const {
    return BoundLaunch<P...>{grid, block, smem, k};
  }
};

}  // namespace quantlab_emu

// ---- Built-in variables ------------------------------------------------------------------

#define threadIdx (::quantlab_emu::self().thread_idx)
#define blockIdx (::quantlab_emu::self().block_idx)
#define blockDim (::quantlab_emu::self().block_dim)
#define gridDim (::quantlab_emu::self().grid_dim)
constexpr int warpSize = 32;

// ---- Synchronisation ---------------------------------------------------------------------

inline void __syncthreads() { quantlab_emu::syncthreads(); }
inline int __syncthreads_or(int predicate) { return quantlab_emu::syncthreads_or(predicate); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { quantlab_emu::syncwarp(mask); }
// Device-wide ordering of this thread's memory accesses (modelled as a sequentially consistent
// fence; CTAs run one at a time, so its effect between CTAs is not exercised).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { quantlab_emu::fail("trap", "the kernel executed __trap()"); }

template <typename T>
T atomicAdd(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
inline float atomicAdd(float* address, float value) {
  auto* bits = reinterpret_cast<uint32_t*>(address);
  uint32_t old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float before;
    std::memcpy(&before, &old, 4);
    const float after = before + value;
    uint32_t want;
    std::memcpy(&want, &after, 4);
    if (__atomic_compare_exchange_n(bits, &old, want, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return before;
  }
}

// ---- Loads through the read-only / L2 paths: plain loads on the CPU -------------------------

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// The 32-bit shared-window address PTX takes; here the generic address itself (the PTX
// wrappers of emulation/ptx_emulation.h take generic pointers and check the window).
inline size_t __cvta_generic_to_shared(const void* p) {
  if (!quantlab_emu::is_shared(p, 1)) {
    quantlab_emu::fail("address space", "__cvta_generic_to_shared of %p, not shared memory", p);
  }
  return reinterpret_cast<size_t>(p);
}

// ---- Warp shuffles and votes (CUDA Programming Guide, "Warp Shuffle Functions") ----------

namespace quantlab_emu {

struct ShuffleContext {
  int mode;  // 0 xor, 1 down, 2 up, 3 idx
  int operand;
  int width;
  size_t bytes;
};

QUANTLAB_EMU_NO_TSAN inline void shuffle_combine(const unsigned char (*in)[kSlotBytes],
                                                unsigned char (*out)[kSlotBytes], unsigned mask,
                                                const void* context) {
  const auto& c = *static_cast<const ShuffleContext*>(context);
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const int base = lane & ~(c.width - 1);  // the lane's segment of `width` lanes
    int src = lane;
    switch (c.mode) {
      case 0:  // a later segment returns the caller's own value; earlier ones may be read
        src = (lane ^ c.operand) >= base + c.width ? lane : lane ^ c.operand;
        break;
      case 1: src = (lane - base) + c.operand < c.width ? lane + c.operand : lane; break;
      case 2: src = (lane - base) - c.operand >= 0 ? lane - c.operand : lane; break;
      default: src = base + (c.operand % c.width); break;
    }
    if (src > 31) src = lane;
    if (!(mask >> src & 1u)) {
      fail("warp collective", "shuffle: lane %d reads lane %d, which is not in the mask 0x%08x",
           lane, src, mask);
    }
    quantlab_emu::copy_bytes(out[lane], in[src], c.bytes);
  }
}

template <typename T>
T shuffle(const char* kind, unsigned mask, T var, int mode, int operand, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a 32/64-bit value");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("warp collective", "%s: width %d is not a power of two <= 32", kind, width);
  }
  const ShuffleContext context{mode, operand, width, sizeof(T)};
  T result;
  warp_collective(kind, mask, &var, sizeof(T), &result, sizeof(T), shuffle_combine, &context);
  return result;
}

QUANTLAB_EMU_NO_TSAN inline void ballot_combine(const unsigned char (*in)[kSlotBytes],
                                               unsigned char (*out)[kSlotBytes], unsigned mask,
                                               const void*) {
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && in[lane][0]) ballot |= 1u << lane;
  for (int lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1u) quantlab_emu::copy_bytes(out[lane], &ballot, 4);
}

inline unsigned ballot(const char* kind, unsigned mask, int predicate) {
  const unsigned char p = predicate != 0;
  unsigned result;
  warp_collective(kind, mask, &p, 1, &result, 4, ballot_combine, nullptr);
  return result;
}

}  // namespace quantlab_emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return quantlab_emu::shuffle("__shfl_xor_sync", mask, var, 0, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return quantlab_emu::shuffle("__shfl_down_sync", mask, var, 1, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return quantlab_emu::shuffle("__shfl_up_sync", mask, var, 2, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return quantlab_emu::shuffle("__shfl_sync", mask, var, 3, src_lane, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return quantlab_emu::ballot("__ballot_sync", mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return quantlab_emu::ballot("__any_sync", mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return quantlab_emu::ballot("__all_sync", mask, predicate) == mask;
}
