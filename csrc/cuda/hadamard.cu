// Online Walsh-Hadamard transform of each row: y = (H_m (x) H_{2^p}) x / sqrt(n), n = cols = m * 2^p, fp32 inside.
// The math, the pass structure and the index convention are hadamard_math.cuh's (PQK_HD, executed on the host by
// tests/hadamard_harness.cpp); this file adds the instructions (shuffles, barriers, loads/stores) and the launcher.
//
// Size limit: hadamard_kernel keeps the fp32 row in shared memory (4n bytes + H_m's sign bits): n <= ~41,700 on
// sm_80 (163 KB opt-in), ~25,300 on sm_86/89 (99 KB), ~58,100 on sm_90 (227 KB). Longer rows with m > 1 take
// hadamard_chunked_kernel (a few subrows at a time, the m-point sums in registers, bit-identical): n <= 28672, so
// 28672 = 28 * 1024 (Llama-3-70B) runs on every arch. Beyond both pqk_hadamard returns PQK_ERR_HADAMARD_SIZE and
// launches nothing (hadamard.py's hadamard_transform is the fallback).
//
// Memory-bound, not tuned: 2-byte loads and stores (no 16-byte vectors), one pass through shared memory per 3
// butterfly stages above the 5 shuffle stages, n * m / 4 shared loads for the m-point stage.
#include "cuda_common.cuh"
#include "hadamard_math.cuh"

namespace pqk {
namespace cuda {
namespace {

// Passes 1.. of one row (or chunk of subrows): `count` elements of src (a multiple of P) -> dst in shared memory,
// H_P applied to each subrow. Ends without a barrier: the caller syncs before reading dst.
template <class T>
__device__ __forceinline__ void butterflies(const T* src, float* dst, int count, const HadamardShape& s) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int shuffle_stages = hadamard_shuffle_stages(s.p);
  // pass 1: global -> shuffle butterflies on b's bits 0..4 -> shared. base is warp-uniform, so all 32 lanes run
  // every iteration and every shuffle (lanes past count carry a dummy 0 and never reach a valid lane: the partner
  // of a valid element differs from it only in a bit below p and is valid too).
  for (int base = warp * 32; base < count; base += kHadThreads) {
    const int i = base + lane;
    float v = i < count ? load_float(src, i) : 0.0f;
    for (int j = 0; j < shuffle_stages; ++j) {
      const int mask = hadamard_lane_mask(j);
      v = hadamard_butterfly(v, __shfl_xor_sync(0xffffffffu, v, mask), (lane & mask) != 0);
    }
    if (i < count) dst[i] = v;
  }
  // passes 2..: b's bits 5..p-1, three at a time in registers
  for (int lo = 5; lo < s.p; lo += kHadRegBits) {
    __syncthreads();
    const int nb = hadamard_reg_bits(s.p, lo);
    for (int g = tid; g < (count >> nb); g += kHadThreads) hadamard_group_pass(dst, g, lo, nb);
  }
}

// H_m's sign bits once per block; the grid-stride loop over rows amortizes the m * m global reads.
__device__ __forceinline__ void load_sign_bits(const float* had_m, const HadamardShape& s, uint32_t* hbits_sh) {
  if (s.m > 1)
    for (int q = threadIdx.x; q < s.m * s.words; q += kHadThreads)
      hbits_sh[q] = hadamard_sign_word(had_m, s.m, q / s.words, q % s.words);
}

template <class T>
__global__ void __launch_bounds__(kHadThreads) hadamard_kernel(
    const T* x,              // fp16/bf16/fp32 [rows, n]; may alias y (a row is fully read before it is written)
    T* y,                    // same dtype [rows, n]
    const float* had_m,      // fp32 [m, m], entries +-1 (only their signs are read); unused when m == 1
    HadamardShape s,         // m, p, n = m * 2^p, words = ceil(m / 32) (hadamard_shape)
    float scale,             // 1 / sqrt(n) (hadamard_default_scale)
    int rows) {
  extern __shared__ float smem[];  // [n] fp32 row, then [m * words] uint32 sign bits of H_m (hadamard_smem_bytes)
  float* row_sh = smem;
  uint32_t* hbits_sh = reinterpret_cast<uint32_t*>(smem + s.n);
  load_sign_bits(had_m, s, hbits_sh);
  const int out_items = hadamard_out_items(s);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    T* y_row = y + (long)r * s.n;
    butterflies(x + (long)r * s.n, row_sh, s.n, s);
    __syncthreads();
    // last pass: m-point stage, scale, round to T, store
    for (int w = threadIdx.x; w < out_items; w += kHadThreads)
      hadamard_out_item(row_sh, hbits_sh, s, w, scale, [&](int i, float v) { store_float(y_row, i, v); });
    __syncthreads();  // the next row overwrites row_sh
  }
}

// Rows longer than shared memory (hadamard_chunk_rows): chunk_rows subrows at a time through shared memory, the
// m-point sums in registers (hadamard_math.cuh explains why this is bit-identical to hadamard_kernel).
template <class T>
__global__ void __launch_bounds__(kHadThreads) hadamard_chunked_kernel(
    const T* x,              // fp16/bf16/fp32 [rows, n]; must NOT alias y (chunks are stored after later reads)
    T* y,                    // same dtype [rows, n]
    const float* had_m,      // fp32 [m, m], entries +-1; m > 1
    HadamardShape s,         // as above
    float scale,             // 1 / sqrt(n)
    int rows,
    int chunk_rows) {        // subrows per chunk (hadamard_chunk_rows), 1..m
  extern __shared__ float smem[];  // [chunk_rows * P] fp32, then the sign bits (hadamard_chunked_smem_bytes)
  float* chunk_sh = smem;
  uint32_t* hbits_sh = reinterpret_cast<uint32_t*>(smem + (chunk_rows << s.p));
  load_sign_bits(had_m, s, hbits_sh);
  const int out_items = hadamard_out_items(s), tid = threadIdx.x;
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float acc[kHadChunkItems][kHadRowTile];  // item j = tid + j * kHadThreads; compile-time indices: registers
#pragma unroll
    for (int j = 0; j < kHadChunkItems; ++j)
#pragma unroll
      for (int q = 0; q < kHadRowTile; ++q) acc[j][q] = 0.0f;
    for (int a_lo = 0; a_lo < s.m; a_lo += chunk_rows) {
      const int a_hi = a_lo + chunk_rows < s.m ? a_lo + chunk_rows : s.m;
      __syncthreads();  // every thread is done reading the previous chunk (and the sign bits are in place)
      butterflies(x + (long)r * s.n + ((long)a_lo << s.p), chunk_sh, (a_hi - a_lo) << s.p, s);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kHadChunkItems; ++j)
        if (tid + j * kHadThreads < out_items)
          hadamard_accumulate(chunk_sh, hbits_sh, s, tid + j * kHadThreads, a_lo, a_hi, acc[j]);
    }
    T* y_row = y + (long)r * s.n;
#pragma unroll
    for (int j = 0; j < kHadChunkItems; ++j)
      if (tid + j * kHadThreads < out_items)
        hadamard_store_item(s, tid + j * kHadThreads, acc[j], scale, [&](int i, float v) { store_float(y_row, i, v); });
  }
}

template <class T>
int launch(const void* x, void* y, const float* had_m, const HadamardShape& s, int rows, cudaStream_t stream) {
  int dev = 0, sms = 0, smem_optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  const long smem = hadamard_smem_bytes(s);
  // Enough blocks to fill every SM a few times over; more rows are covered by the grid-stride loop (each block then
  // builds H_m's sign bits once for several rows).
  const int grid = rows < 4 * sms ? rows : 4 * sms;
  const float scale = hadamard_default_scale(s.n);
  if (smem <= smem_optin) {
    if (smem > 48 * 1024) {  // above the default 48 KB a kernel must opt in (no-op for later calls of the same size)
      e = cudaFuncSetAttribute(hadamard_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return static_cast<int>(e);
    }
    hadamard_kernel<T><<<grid, kHadThreads, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), had_m, s,
                                                            scale, rows);
    return launch_status();
  }
  // The row does not fit: the chunked kernel, if the shape allows it (hadamard_chunk_rows), else nothing.
  const int chunk_rows = hadamard_chunk_rows(s, smem_optin);
  if (chunk_rows == 0) return PQK_ERR_HADAMARD_SIZE;
  if (x == y) return PQK_ERR_ARG;  // in place: a later chunk would read outputs (the Python binding never aliases)
  const long csmem = hadamard_chunked_smem_bytes(s, chunk_rows);
  if (csmem > 48 * 1024) {
    e = cudaFuncSetAttribute(hadamard_chunked_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)csmem);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  hadamard_chunked_kernel<T><<<grid, kHadThreads, csmem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                                   had_m, s, scale, rows, chunk_rows);
  return launch_status();
}

}  // namespace
}  // namespace cuda
}  // namespace pqk

using namespace pqk::cuda;

extern "C" int pqk_hadamard(const void* x, void* y, int x_dtype, const float* had_m, int m, int rows, int cols,
                            pqk_stream_t stream) {
  HadamardShape s;
  if (int st = hadamard_shape(m, rows, cols, &s)) return st;
  if (x == nullptr || y == nullptr || (m > 1 && had_m == nullptr)) return PQK_ERR_ARG;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case kF16: return launch<__half>(x, y, had_m, s, rows, st);
    case kBF16: return launch<__nv_bfloat16>(x, y, had_m, s, rows, st);
    case kF32: return launch<float>(x, y, had_m, s, rows, st);
    default: return PQK_ERR_ARG;
  }
}
