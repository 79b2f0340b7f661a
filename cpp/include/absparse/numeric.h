// Element types and scalar conversions shared by the CPU reference and the bindings.
//
// float16 and bfloat16 are carried as raw uint16_t bit patterns so that this header needs neither
// CUDA nor a half-precision library. Conversions round to nearest, ties to even, like the hardware.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace absparse {

enum class DType : int32_t { kFloat32 = 0, kFloat16, kBFloat16, kInt32, kInt8, kUInt8 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt8: case DType::kUInt8: return 1;
  }
  return 0;
}

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);  // keep NaN quiet
  u += 0x7FFF + ((u >> 16) & 1);                                      // round half to even
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t man = h & 0x3FF;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000 | (man << 13));  // inf / NaN
  if (exp == 0) {                                                        // zero / subnormal
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t abs = u & 0x7FFFFFFF;
  if (abs >= 0x7F800000) return sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0);  // inf / NaN
  if (abs >= 0x477FF000) return sign | 0x7C00;  // rounds past 65504: overflow to inf
  if (abs < 0x38800000) {                        // below the smallest normal 2^-14: subnormal
    // value = abs_float; subnormal code = round_half_even(value * 2^24)
    const float v = bits_float(abs);
    return sign | static_cast<uint16_t>(std::nearbyint(v * 16777216.0f));
  }
  uint32_t r = abs - 0x38000000;        // rebias exponent 127 -> 15 (shifted by 13 below)
  r += 0xFFF + ((r >> 13) & 1);         // round half to even on the 13 dropped bits
  return sign | static_cast<uint16_t>(r >> 13);
}

// Loads element i of a float tensor of dtype t as float32.
inline float load_float(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Stores a float32 value as element i of a float tensor of dtype t (rounded to nearest even).
inline void store_float(void* base, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// float64 -> float32 rounded to odd (truncate, then set the last bit if inexact). Rounding that
// float32 to fp16/bf16 (<= 11 significant bits, 13+ fewer than float32) then equals rounding the
// float64 value directly: the classic fix for double rounding.
inline float round_to_odd_float(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) == v || std::isnan(v) || std::isinf(f)) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  return bits_float(float_bits(f) | 1u);
}

// Stores a float64 value as element i of a float tensor of dtype t, rounded once (to nearest even).
inline void store_double(void* base, int64_t i, DType t, double v) {
  if (t == DType::kFloat32) {
    static_cast<float*>(base)[i] = static_cast<float>(v);
  } else {
    store_float(base, i, t, round_to_odd_float(v));
  }
}

}  // namespace absparse
