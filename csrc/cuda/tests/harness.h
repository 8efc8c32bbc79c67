// Shared pieces of the host harnesses (g++, no CUDA): a deterministic RNG, pass/fail counting, and the warp
// instructions the kernels use, emulated on the host: __shfl_xor_sync over 32 lanes and the MMA instructions.
//
// The MMA emulators are written from the PTX ISA fragment tables ("Matrix fragments for mma.m16n8k64" /
// "mma.m16n8k32", element index i -> (row, col)), deliberately in the table's own form and not with the
// kernels' gemm_math.cuh functions, so a wrong index function in the kernel disagrees with them.
#pragma once

#include <stdint.h>
#include <stdio.h>

#include <cstring>
#include <vector>

namespace harness {

struct Rng {  // splitmix64: the same stream on every machine
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint8_t byte() { return (uint8_t)next(); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * (1.0 / 16777216.0)); }
};

struct Counter {
  int passed = 0, failed = 0;
  // A failing case prints its name; the summary line " N passed, M failed" is what the pytest wrapper reads.
  void check(bool ok, const char* what) {
    if (ok) {
      ++passed;
    } else {
      ++failed;
      printf("FAIL %s\n", what);
    }
  }
  int finish(const char* name) {
    printf("%s: %d passed, %d failed\n", name, passed, failed);
    return failed == 0 ? 0 : 1;
  }
};

inline int nib(uint32_t x, int i) {  // sign-extended nibble i of a register (element 0 = low nibble)
  int v = (int)((x >> (4 * i)) & 15u);
  return v >= 8 ? v - 16 : v;
}
inline int sbyte(uint32_t x, int i) { return (int)(int8_t)(uint8_t)(x >> (8 * i)); }

// An m16n8kK MMA over the 32 lanes of a warp, c[lane] += A x B, given the PTX fragment table as two functions:
// a_at(g, t, i) -> (row, col) of A element i and b_at(t, i) -> K row of B element i (its column is g). Elements are
// EB bits wide, element i of a lane sits in register i / (32 / EB) at position i % (32 / EB), element 0 lowest.
// C (all integer shapes): c_i row = g (+8 if i >= 2), col = t*2 + (i & 1).
template <int K, int EB, class AAt, class BAt>
void emu_mma(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4], AAt a_at, BAt b_at) {
  constexpr int per_reg = 32 / EB;
  auto elem = [](uint32_t x, int i) { return EB == 4 ? nib(x, i) : sbyte(x, i); };
  int A[16][K], B[K][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4 * per_reg; ++i) {
      int row, col;
      a_at(g, t, i, row, col);
      A[row][col] = elem(a[lane][i / per_reg], i % per_reg);
    }
    for (int i = 0; i < 2 * per_reg; ++i) B[b_at(t, i)][g] = elem(b[lane][i / per_reg], i % per_reg);
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + (i >= 2 ? 8 : 0), col = (lane % 4) * 2 + (i & 1);
      int32_t s = 0;
      for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += s;
    }
}

// mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32. PTX table: a_i, i in 0..31: row = g if i < 8 or 16 <= i < 24
// else g + 8, col = t*8 + (i & 7) (+32 if i >= 16).  b_i, i in 0..15: row = t*8 + (i & 7) (+32 if i >= 8).
inline void emu_mma_m16n8k64_s4(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
  emu_mma<64, 4>(
      a, b, c,
      [](int g, int t, int i, int& row, int& col) {
        row = (i < 8 || (i >= 16 && i < 24)) ? g : g + 8;
        col = t * 8 + (i & 7) + (i >= 16 ? 32 : 0);
      },
      [](int t, int i) { return t * 8 + (i & 7) + (i >= 8 ? 32 : 0); });
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32. PTX table: a_i, i in 0..15: row = g if i < 4 or 8 <= i < 12
// else g + 8, col = t*4 + (i & 3) (+16 if i >= 8).  b_i, i in 0..7: row = t*4 + (i & 3) (+16 if i >= 4).
inline void emu_mma_m16n8k32_s8(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
  emu_mma<32, 8>(
      a, b, c,
      [](int g, int t, int i, int& row, int& col) {
        row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
        col = t * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      },
      [](int t, int i) { return t * 4 + (i & 3) + (i >= 4 ? 16 : 0); });
}

// __shfl_xor_sync(full mask, v, mask) for all 32 lanes at once: lane l receives lane l ^ mask's value.
template <class T>
std::vector<T> shfl_xor(const std::vector<T>& v, int mask) {
  std::vector<T> r(v.size());
  for (size_t l = 0; l < v.size(); ++l) r[l] = v[(l & ~(size_t)31) | ((l & 31) ^ (size_t)mask)];
  return r;
}

inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace harness
