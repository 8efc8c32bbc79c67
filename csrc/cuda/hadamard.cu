// Online Walsh-Hadamard transform of each row: y = (H_m (x) H_{2^p}) x / sqrt(n), n = cols = m * 2^p, fp32 inside.
// The math, the pass structure and the index convention are hadamard_math.cuh's (PQK_HD, executed on the host by
// tests/hadamard_harness.cpp); this file adds the instructions (shuffles, barriers, loads/stores) and the launcher.
//
// Size limit: the fp32 row lives in shared memory (4n bytes + H_m's sign bits), so n is bounded by the device's
// opt-in shared memory per block: sm_80 n <= ~41,700 (163 KB), sm_86/89 n <= ~25,300 (99 KB), sm_90 n <= ~58,100
// (227 KB). Above it pqk_hadamard returns PQK_ERR_HADAMARD_SIZE and launches nothing (hadamard.py's
// hadamard_transform is the fallback). So 28672 = 28 * 1024 runs on sm_80/90 but not on sm_86/89.
//
// Memory-bound, not tuned: 2-byte loads and stores (no 16-byte vectors), one pass through shared memory per 3
// butterfly stages above the 5 shuffle stages, n * m / 4 shared loads for the m-point stage.
#include "cuda_common.cuh"
#include "hadamard_math.cuh"

namespace pqk {
namespace cuda {
namespace {

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
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  // H_m's sign bits once per block; the grid-stride loop over rows amortizes the m * m global reads.
  if (s.m > 1)
    for (int q = tid; q < s.m * s.words; q += kHadThreads)
      hbits_sh[q] = hadamard_sign_word(had_m, s.m, q / s.words, q % s.words);

  const int shuffle_stages = hadamard_shuffle_stages(s.p);
  const int out_items = hadamard_out_items(s);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x_row = x + (long)r * s.n;
    T* y_row = y + (long)r * s.n;
    // pass 1: global -> shuffle butterflies on b's bits 0..4 -> shared. base is warp-uniform, so all 32 lanes run
    // every iteration and every shuffle (lanes past n carry a dummy 0 and never reach a valid lane: the partner of a
    // valid element differs from it only in a bit below p and is valid too).
    for (int base = warp * 32; base < s.n; base += kHadThreads) {
      const int i = base + lane;
      float v = i < s.n ? load_float(x_row, i) : 0.0f;
      for (int j = 0; j < shuffle_stages; ++j) {
        const int mask = hadamard_lane_mask(j);
        v = hadamard_butterfly(v, __shfl_xor_sync(0xffffffffu, v, mask), (lane & mask) != 0);
      }
      if (i < s.n) row_sh[i] = v;
    }
    // passes 2..: b's bits 5..p-1, three at a time in registers
    for (int lo = 5; lo < s.p; lo += kHadRegBits) {
      __syncthreads();
      const int nb = hadamard_reg_bits(s.p, lo);
      for (int g = tid; g < (s.n >> nb); g += kHadThreads) hadamard_group_pass(row_sh, g, lo, nb);
    }
    __syncthreads();
    // last pass: m-point stage, scale, round to T, store
    for (int w = tid; w < out_items; w += kHadThreads)
      hadamard_out_item(row_sh, hbits_sh, s, w, scale, [&](int i, float v) { store_float(y_row, i, v); });
    __syncthreads();  // the next row overwrites row_sh
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
  if (smem > smem_optin) return PQK_ERR_HADAMARD_SIZE;
  if (smem > 48 * 1024) {  // above the default 48 KB a kernel must opt in (no-op for later calls of the same size)
    e = cudaFuncSetAttribute(hadamard_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  // Enough blocks to fill every SM a few times over; more rows are covered by the grid-stride loop (each block then
  // builds H_m's sign bits once for several rows).
  const int grid = rows < 4 * sms ? rows : 4 * sms;
  hadamard_kernel<T><<<grid, kHadThreads, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), had_m, s,
                                                          hadamard_default_scale(s.n), rows);
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
