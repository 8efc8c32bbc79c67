// Activation kernels: static quantize (elementwise), dynamic per-token quantize (the baseline: a max-reduction per
// row first) and fused RMSNorm + static quantize. Formulas and thread/warp schedules: quantize_math.cuh (PQK_HD,
// executed on the host by tests/quantize_harness.cpp); quantization: common/quant_math.h.
//
// Memory-bound kernels, not tuned: 2-byte loads, one pair per thread and iteration. A 16-byte vector path is the
// obvious next step and is not written.
#include "cuda_common.cuh"
#include "quantize_math.cuh"

namespace pqk {
namespace cuda {
namespace {

// out = quantize(x, *scale): a pure elementwise map, no reduction — what a static scale buys.
template <class T>
__global__ void quantize_static_kernel(
    const T* __restrict__ x,          // fp16/bf16/fp32 [rows * cols], contiguous
    void* __restrict__ out,           // bits 4: uint8 [rows * cols / 2]; bits 8: int8 [rows * cols]
    const float* __restrict__ scale,  // fp32 [1], finite and > 0 (checked by the op layer)
    int bits, long numel) {           // numel even for bits 4 (cols even), so a pair never straddles two rows
  const float s = *scale;
  const long pairs = (numel + 1) / 2;
  for (long p = blockIdx.x * (long)blockDim.x + threadIdx.x; p < pairs; p += (long)gridDim.x * blockDim.x) {
    const bool two = 2 * p + 1 < numel;
    store_quantized_pair(bits, out, p, two, load_float(x, 2 * p), two ? load_float(x, 2 * p + 1) : 0.0f, s);
  }
}

// Block-wide reduction of one float per thread: warp butterfly (shuffles), then warp totals in warp order.
// Every thread returns the same bits (the order is fixed: quantize_math.cuh).
template <class Combine>
__device__ __forceinline__ float block_reduce(float v, Combine combine) {
  __shared__ float warp_totals[kRowWarps];
#pragma unroll
  for (int s = 0; s < 5; ++s) v = combine(v, __shfl_xor_sync(0xffffffffu, v, butterfly_offset(s)));
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  return combine_warps(warp_totals, kRowWarps, combine);
}

// One block per row. kRmsNorm = false: per-token scale = amax / qmax, then quantize (the dynamic baseline).
// kRmsNorm = true: y = rmsnorm(x) * weight in fp32, quantized with the static *scale; optionally y stored too.
template <class T, bool kRmsNorm>
__global__ void __launch_bounds__(kRowThreads) row_quantize_kernel(
    const T* __restrict__ x,          // fp16/bf16/fp32 [rows, cols]
    const T* __restrict__ weight,     // RMSNorm: same dtype [cols]; else unused
    float eps,                        // RMSNorm epsilon
    const float* __restrict__ scale,  // RMSNorm: fp32 [1] static scale; else unused
    void* __restrict__ q,             // bits 4: uint8 [rows, cols / 2]; bits 8: int8 [rows, cols]
    float* __restrict__ scales_out,   // per-token: fp32 [rows]; else unused
    T* __restrict__ normed_out,       // RMSNorm: same dtype [rows, cols] or null
    int bits, int cols) {
  const long row = blockIdx.x;
  const T* xr = x + row * cols;
  auto load = [&](int i) { return load_float(xr, i); };
  float s, inv = 0.0f;
  if constexpr (kRmsNorm) {
    const float sumsq = block_reduce(thread_reduce(load, cols, threadIdx.x, kRowThreads, 0.0f, sumsq_step), sum_combine);
    inv = rms_inv(sumsq, cols, eps);
    s = *scale;
  } else {
    const float amax = block_reduce(thread_reduce(load, cols, threadIdx.x, kRowThreads, 0.0f, amax_step), max_combine);
    s = per_token_scale_from_amax(amax, qmax_for_bits(bits));
    if (threadIdx.x == 0) scales_out[row] = s;
  }
  void* q_row = static_cast<uint8_t*>(q) + row * (bits == 4 ? cols / 2 : cols);
  for_each_pair(cols, threadIdx.x, kRowThreads, [&](int p, bool two) {
    float y0 = load(2 * p), y1 = two ? load(2 * p + 1) : 0.0f;
    if constexpr (kRmsNorm) {
      y0 = rms_value(y0, inv, load_float(weight, 2 * p));
      if (two) y1 = rms_value(y1, inv, load_float(weight, 2 * p + 1));
      if (normed_out != nullptr) {
        store_float(normed_out, row * cols + 2 * p, y0);
        if (two) store_float(normed_out, row * cols + 2 * p + 1, y1);
      }
    }
    store_quantized_pair(bits, q_row, p, two, y0, y1, s);
  });
}

// Dispatch on the input dtype code: fn(T*) with T the element type.
template <class Fn>
int with_float_type(int x_dtype, Fn&& fn) {
  switch (x_dtype) {
    case kF16: return fn(static_cast<const __half*>(nullptr));
    case kBF16: return fn(static_cast<const __nv_bfloat16*>(nullptr));
    case kF32: return fn(static_cast<const float*>(nullptr));
    default: return PQK_ERR_ARG;
  }
}

int check_rows(int bits, int rows, int cols) {
  if (rows <= 0 || cols <= 0) return PQK_ERR_SHAPE;
  if (bits != 4 && bits != 8) return PQK_ERR_ARG;
  if (bits == 4 && cols % 2 != 0) return PQK_ERR_SHAPE;
  return PQK_OK;
}

}  // namespace
}  // namespace cuda
}  // namespace pqk

using namespace pqk::cuda;

extern "C" int pqk_quantize_static(const void* x, int x_dtype, void* out, const float* scale, int bits, int rows,
                                   int cols, pqk_stream_t stream) {
  if (int st = check_rows(bits, rows, cols)) return st;
  if (x == nullptr || out == nullptr || scale == nullptr) return PQK_ERR_ARG;
  const long numel = (long)rows * cols;
  const int threads = 256;
  const long blocks = ((numel + 1) / 2 + threads - 1) / threads;
  const int grid = (int)(blocks < 65535 ? blocks : 65535);  // grid-stride loop covers the rest
  return with_float_type(x_dtype, [&](auto* tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    quantize_static_kernel<T><<<grid, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), out, scale, bits, numel);
    return launch_status();
  });
}

extern "C" int pqk_quantize_per_token(const void* x, int x_dtype, void* out, float* scales_out, int bits, int rows,
                                      int cols, pqk_stream_t stream) {
  if (int st = check_rows(bits, rows, cols)) return st;
  if (x == nullptr || out == nullptr || scales_out == nullptr) return PQK_ERR_ARG;
  return with_float_type(x_dtype, [&](auto* tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_quantize_kernel<T, false><<<rows, kRowThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), nullptr, 0.0f, nullptr, out, scales_out, nullptr, bits, cols);
    return launch_status();
  });
}

extern "C" int pqk_rmsnorm_quantize(const void* x, int x_dtype, const void* weight, float eps, const float* scale,
                                    int bits, void* q_out, void* normed_out, int rows, int cols, pqk_stream_t stream) {
  if (int st = check_rows(bits, rows, cols)) return st;
  if (x == nullptr || weight == nullptr || scale == nullptr || q_out == nullptr || !(eps >= 0.0f)) return PQK_ERR_ARG;
  return with_float_type(x_dtype, [&](auto* tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_quantize_kernel<T, true><<<rows, kRowThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), eps, scale, q_out, nullptr,
        static_cast<T*>(normed_out), bits, cols);
    return launch_status();
  });
}
