// INT4 x INT4 GEMM on CUTLASS 2.x (sm_80/86/89) with the dequant fused as an epilogue visitor tree (EVT).
//
//   out[m, n] = half( float(acc[m, n]) * (a_scale[m or 0] * w_scale[n]) + bias[n] )
//   acc = A[M, K] x W[N, K]^T, int4 operands packed two per byte (prefixquant_kernels/format.py = cutlass::int4b_t
//   order: element 2i in the low nibble), exact int32 accumulation.
//
// This is the path for the plain dequant epilogues (fp16 / bf16 out) on the archs with INT4 tensor cores: CUTLASS's
// mainloop (ldmatrix fragment loads, 128-element K stages, multistage cp.async) is the tuned one. int4_gemm.cu keeps
// the epilogues CUTLASS does not express well (requantize to packed int4, SiLU·mul requant over interleaved gate/up
// columns), fp32 out, shapes CUTLASS cannot take (N % 8 != 0) and sm_90 (no INT4 MMA). pqk_int4_gemm chooses.
//
// The EVT (one visitor node per line):
//   D   = AuxStore<half | bf16>(                       row-major [M, N], 128-bit stores
//           Compute<DequantBiasFn>(                    gemm_math.cuh, host-tested: the reference's fp32 order
//             AccFetch,                                int32 acc -> fp32 (round to nearest, = torch's .float())
//             ColBroadcast(a_scale, stride_m),         stride_m = 1: per-token [M]; 0: per-tensor (one element)
//             RowBroadcast(w_scale),                   [N]
//             RowBroadcast(bias or null -> 0.0f)))     [N]; adding +0.0 is exact since y is never -0.0
// Scales and bias are read from device memory, so a CUDA graph captures the launch with them.
//
// Compiled only for sm_80/86/89 (cuda_build.FILE_ARCHS): on sm_90 ptxas would have no INT4 MMA to emit.
// (Order matters: visitors.hpp relies on the gemm and numeric-conversion headers gemm_universal.h pulls in.)
#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>

#include "cuda_common.cuh"
#include "gemm_cutlass.h"
#include "gemm_math.cuh"

namespace pqk {
namespace cuda {
namespace {

using cute::_0;
using cute::_1;
using cute::Stride;
namespace tb = cutlass::epilogue::threadblock;

// Tile shapes by M (elements; K per stage 128 = 64 packed bytes per row = four 16-byte cp.async chunks):
//   decode (M <= 16):   16 x  64 x 256, warps 16 x 32 x 256 (2 warps): many blocks along N for a GEMV-like M,
//                       K = 256 per stage halves the barriers per byte streamed; 4 stages keep ~40 KB in flight.
//   mid (M <= 256):     64 x 128 x 128, warps 32 x 64 (4 warps), 4 stages (48 KB).
//   prefill:           128 x 256 x 128, warps 64 x 64 (8 warps), 3 stages (72 KB): QuaRot's (= CUTLASS's default)
//                       int4 tile.
// These are the standard CUTLASS choices, not measured ones (no GPU here); python -m prefixquant_kernels selftest
// times every config on the user's GPU.
template <int BM, int BN, int BK, int WM, int WN, int WK, int STAGES>
struct CutlassTile {
  using Block = cutlass::gemm::GemmShape<BM, BN, BK>;
  using Warp = cutlass::gemm::GemmShape<WM, WN, WK>;
  static constexpr int kStages = STAGES;
};
using DecodeTile = CutlassTile<16, 64, 256, 16, 32, 256, 4>;
using MidTile = CutlassTile<64, 128, 128, 32, 64, 128, 4>;
using PrefillTile = CutlassTile<128, 256, 128, 64, 64, 128, 3>;

template <class T> struct CutlassOut;
template <> struct CutlassOut<__half> { using T = cutlass::half_t; };
template <> struct CutlassOut<__nv_bfloat16> { using T = cutlass::bfloat16_t; };

template <class Tile, class OutT>
struct DequantGemm {
  using ElementOut = typename CutlassOut<OutT>::T;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;  // 8 halves: N % 8 == 0
  static constexpr int kAlignIn = 128 / cutlass::sizeof_bits<cutlass::int4b_t>::value;  // 32 nibbles: K % 32 == 0
  static constexpr int kEvtStages = 1;

  using ThreadMap = tb::OutputTileThreadLayout<typename Tile::Block, typename Tile::Warp, ElementOut, kAlignOut,
                                               kEvtStages>;
  using Acc = tb::VisitorAccFetch;
  using AScale = tb::VisitorColBroadcast<ThreadMap, float, Stride<int64_t, _0, _0>>;  // dCol: (stride_m, 0, 0)
  using WScale = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int32_t>>;
  using Bias = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int32_t>>;
  using Dequant = tb::VisitorCompute<DequantBiasFn, float, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using EvtDequant = tb::Sm80EVT<Dequant, Acc, AScale, WScale, Bias>;
  using Store = tb::VisitorAuxStore<ThreadMap, ElementOut, cutlass::FloatRoundStyle::round_to_nearest,
                                    Stride<int64_t, _1, int64_t>>;
  using Evt = tb::Sm80EVT<Store, EvtDequant>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      cutlass::int4b_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignIn,     // A [M, K]
      cutlass::int4b_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignIn,  // W [N, K] = B^T
      ElementOut, cutlass::layout::RowMajor, kAlignOut,
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename Tile::Block, typename Tile::Warp, cutlass::gemm::GemmShape<16, 8, 64>,  // mma.m16n8k64.s4
      Evt, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Tile::kStages,
      // The only int4 MMA CUTLASS has is .satfinite; |acc| <= 64 K never reaches int32 saturation for K < 2^25.
      cutlass::arch::OpMultiplyAddSaturate, kEvtStages>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const uint8_t* a, const uint8_t* w, OutT* out, const float* a_scale, int a_scale_per_token,
                 const float* w_scale, const float* bias, int m, int n, int k, cudaStream_t stream) {
    typename Evt::Arguments evt{
        {
            {},                                                                        // Acc
            {a_scale, 0.0f, {int64_t(a_scale_per_token ? 1 : 0), _0{}, _0{}}},         // AScale
            {w_scale, 0.0f, {_0{}, _1{}, int32_t(n)}},                                 // WScale
            {bias, 0.0f, {_0{}, _1{}, int32_t(n)}},                                    // Bias (null -> 0)
            {},                                                                        // Dequant
        },
        {reinterpret_cast<ElementOut*>(out), {int64_t(n), _1{}, int64_t(m) * n}},      // Store
    };
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k}, /*batch_count=*/1, evt,
                                  a, w, /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,
                                  /*batch strides A, B, C, D=*/int64_t(m) * k, int64_t(n) * k, 0, 0,
                                  /*ldA=*/k, /*ldB=*/k, /*ldC=*/0, /*ldD=*/0);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return PQK_ERR_ARG;
    // kGemm mode with batch 1 needs no workspace; refusing any keeps the launch allocation-free (graph capture).
    if (Gemm::get_workspace_size(args) != 0) return PQK_ERR_ARG;
    // initialize() also raises the kernel's dynamic shared-memory limit when the tile needs > 48 KB (a function
    // attribute, not a stream operation: allowed while a stream is being captured).
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return launch_status_or(PQK_ERR_ARG);
    if (gemm.run(stream) != cutlass::Status::kSuccess) return launch_status_or(PQK_ERR_ARG);
    return launch_status();
  }

  // A launch failure leaves a cudaError_t; anything else CUTLASS refused is an argument problem.
  static int launch_status_or(int fallback) {
    const int s = launch_status();
    return s != PQK_OK ? s : fallback;
  }
};

template <class OutT>
int run_config(int config, const uint8_t* a, const uint8_t* w, OutT* out, const float* a_scale, int per_token,
               const float* w_scale, const float* bias, int m, int n, int k, cudaStream_t s) {
  switch (config) {
    case kCutlassDecode: return DequantGemm<DecodeTile, OutT>::run(a, w, out, a_scale, per_token, w_scale, bias, m, n, k, s);
    case kCutlassMid: return DequantGemm<MidTile, OutT>::run(a, w, out, a_scale, per_token, w_scale, bias, m, n, k, s);
    case kCutlassPrefill:
      return DequantGemm<PrefillTile, OutT>::run(a, w, out, a_scale, per_token, w_scale, bias, m, n, k, s);
    default: return PQK_ERR_ARG;
  }
}

}  // namespace

int cutlass_dequant_gemm(const uint8_t* a, const uint8_t* w, void* out, int out_is_bf16, const float* a_scale,
                         int a_scale_per_token, const float* w_scale, const float* bias, int m, int n, int k,
                         int config, cudaStream_t stream) {
  if (out_is_bf16)
    return run_config(config, a, w, static_cast<__nv_bfloat16*>(out), a_scale, a_scale_per_token, w_scale, bias, m, n,
                      k, stream);
  return run_config(config, a, w, static_cast<__half*>(out), a_scale, a_scale_per_token, w_scale, bias, m, n, k,
                    stream);
}

}  // namespace cuda
}  // namespace pqk
