// The CPU emulation's CUDA built-in vector types (vector_types.h / vector_functions.h of the
// CUDA toolkit): charN, ucharN, shortN, ushortN, intN, uintN, longN, ulongN, longlongN,
// ulonglongN, floatN, doubleN for N = 1..4, with the alignments the CUDA C++ Programming Guide
// lists in "Built-in Vector Types" (e.g. int2/uint2/float2: 8, int4/uint4/float4/double2: 16;
// the 3-component types have their component's alignment), and their make_<type>() functions.
// dim3 is not defined here (the emulated cuda_runtime.h owns it).
//
// Every type is also marked may_alias: the kernels read and write these types through pointers
// reinterpret_cast from other types (uint4 loads of fp16 data, int4 loads of int8 data), which
// CUDA permits; may_alias keeps g++'s type-based alias analysis from miscompiling that.
// Self-contained: needs no CUDA header and none of the CUDA keyword macros.
#pragma once

#ifndef QUANTLAB_EMU_VECTOR_TYPES
#define QUANTLAB_EMU_VECTOR_TYPES 1

#define QUANTLAB_EMU_VEC1(T, NAME, ALIGN)                         \
  struct __attribute__((aligned(ALIGN), may_alias)) NAME {        \
    T x;                                                          \
  };                                                              \
  inline constexpr NAME make_##NAME(T x) noexcept { return NAME{x}; }

#define QUANTLAB_EMU_VEC2(T, NAME, ALIGN)                         \
  struct __attribute__((aligned(ALIGN), may_alias)) NAME {        \
    T x, y;                                                       \
  };                                                              \
  inline constexpr NAME make_##NAME(T x, T y) noexcept { return NAME{x, y}; }

#define QUANTLAB_EMU_VEC3(T, NAME, ALIGN)                         \
  struct __attribute__((aligned(ALIGN), may_alias)) NAME {        \
    T x, y, z;                                                    \
  };                                                              \
  inline constexpr NAME make_##NAME(T x, T y, T z) noexcept { return NAME{x, y, z}; }

#define QUANTLAB_EMU_VEC4(T, NAME, ALIGN)                         \
  struct __attribute__((aligned(ALIGN), may_alias)) NAME {        \
    T x, y, z, w;                                                 \
  };                                                              \
  inline constexpr NAME make_##NAME(T x, T y, T z, T w) noexcept { return NAME{x, y, z, w}; }

// Alignments as in CUDA's vector_types.h (LP64: sizeof(long) == 8).
QUANTLAB_EMU_VEC1(signed char, char1, 1)
QUANTLAB_EMU_VEC2(signed char, char2, 2)
QUANTLAB_EMU_VEC3(signed char, char3, 1)
QUANTLAB_EMU_VEC4(signed char, char4, 4)
QUANTLAB_EMU_VEC1(unsigned char, uchar1, 1)
QUANTLAB_EMU_VEC2(unsigned char, uchar2, 2)
QUANTLAB_EMU_VEC3(unsigned char, uchar3, 1)
QUANTLAB_EMU_VEC4(unsigned char, uchar4, 4)

QUANTLAB_EMU_VEC1(short, short1, 2)
QUANTLAB_EMU_VEC2(short, short2, 4)
QUANTLAB_EMU_VEC3(short, short3, 2)
QUANTLAB_EMU_VEC4(short, short4, 8)
QUANTLAB_EMU_VEC1(unsigned short, ushort1, 2)
QUANTLAB_EMU_VEC2(unsigned short, ushort2, 4)
QUANTLAB_EMU_VEC3(unsigned short, ushort3, 2)
QUANTLAB_EMU_VEC4(unsigned short, ushort4, 8)

QUANTLAB_EMU_VEC1(int, int1, 4)
QUANTLAB_EMU_VEC2(int, int2, 8)
QUANTLAB_EMU_VEC3(int, int3, 4)
QUANTLAB_EMU_VEC4(int, int4, 16)
QUANTLAB_EMU_VEC1(unsigned int, uint1, 4)
QUANTLAB_EMU_VEC2(unsigned int, uint2, 8)
QUANTLAB_EMU_VEC3(unsigned int, uint3, 4)
QUANTLAB_EMU_VEC4(unsigned int, uint4, 16)

QUANTLAB_EMU_VEC1(long, long1, sizeof(long))
QUANTLAB_EMU_VEC2(long, long2, 2 * sizeof(long))
QUANTLAB_EMU_VEC3(long, long3, sizeof(long))
QUANTLAB_EMU_VEC4(long, long4, 16)
QUANTLAB_EMU_VEC1(unsigned long, ulong1, sizeof(unsigned long))
QUANTLAB_EMU_VEC2(unsigned long, ulong2, 2 * sizeof(unsigned long))
QUANTLAB_EMU_VEC3(unsigned long, ulong3, sizeof(unsigned long))
QUANTLAB_EMU_VEC4(unsigned long, ulong4, 16)

QUANTLAB_EMU_VEC1(long long, longlong1, 8)
QUANTLAB_EMU_VEC2(long long, longlong2, 16)
QUANTLAB_EMU_VEC3(long long, longlong3, 8)
QUANTLAB_EMU_VEC4(long long, longlong4, 16)
QUANTLAB_EMU_VEC1(unsigned long long, ulonglong1, 8)
QUANTLAB_EMU_VEC2(unsigned long long, ulonglong2, 16)
QUANTLAB_EMU_VEC3(unsigned long long, ulonglong3, 8)
QUANTLAB_EMU_VEC4(unsigned long long, ulonglong4, 16)

QUANTLAB_EMU_VEC1(float, float1, 4)
QUANTLAB_EMU_VEC2(float, float2, 8)
QUANTLAB_EMU_VEC3(float, float3, 4)
QUANTLAB_EMU_VEC4(float, float4, 16)
QUANTLAB_EMU_VEC1(double, double1, 8)
QUANTLAB_EMU_VEC2(double, double2, 16)
QUANTLAB_EMU_VEC3(double, double3, 8)
QUANTLAB_EMU_VEC4(double, double4, 16)

#undef QUANTLAB_EMU_VEC1
#undef QUANTLAB_EMU_VEC2
#undef QUANTLAB_EMU_VEC3
#undef QUANTLAB_EMU_VEC4

#endif  // QUANTLAB_EMU_VECTOR_TYPES
