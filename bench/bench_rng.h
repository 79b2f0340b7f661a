// The benchmarks' data generator: splitmix64 (fast, seedable, identical on every platform) and
// values uniform in (-2, 2), never 0 (zeros can hide unwritten outputs and run faster).
#pragma once

#include <cstdint>

namespace absparse_bench {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in (-2, 2), never 0: (u + 0.5) / 2^16 * 4 - 2 for a 16-bit u.
  float uniform() { return (static_cast<float>(next() & 0xFFFF) + 0.5f) / 16384.0f - 2.0f; }

 private:
  uint64_t state_;
};

}  // namespace absparse_bench
