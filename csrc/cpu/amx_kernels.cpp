// AMX kernels (x86-64, AMX-TILE + AMX-INT8: Sapphire Rapids and later Xeons): the AVX512-VNNI table with its prefill
// micro-kernel on tiles instead of zmm registers. One tdpbusd multiplies a 16 x 64 u8 tile of A by a 64 x 16 s8 tile
// of W into a 16 x 16 int32 tile: 16384 MACs, the same u8 x s8 semantics as vpdpbusd (four products summed into each
// int32, no saturation), so the A panel (a + 128), the per-column correction (128 colsum) and the epilogue are the
// zmm ones unchanged and the results equal the reference bit for bit. On the Xeon of docs/PERF.md step 26 a tdpbusd
// loop runs ~6x a vpdpbusd zmm loop per core.
//
// Layouts (kAmxNr = 32 output columns per micro panel = two B tiles of 16):
//   A panel  uint8 [rows / 16][kc / 64][16][64] (PrefillKernels::a_tiled, pf_a_offset): the A tile of 16 rows and
//            64-k step s one contiguous 1 KB at a + 1024 s (rows 16-31: a + 16 lda), loaded at row stride 64
//   W panel  int8 [kq16 / 16][2][16][16][4] per micro panel: dword (q, n) = w[n, 4q .. 4q+3] (pf_pack_w_t<32, true>,
//            panel_offset), zero past the block's k up to a whole 64 k (kq16 = kq rounded up to 16): for each 64-k
//            step s and 16 columns j, the B tile (row r = dword group 16s + r of the 16 columns) as one contiguous
//            1 KB at wp + s * 2048 + 1024 j, row stride 64. Row-major [kq][32][4] (B tiles at stride 128, two
//            tiles' rows interleaved) ran the kernel 2-16 % slower (benchmarks/amx_tile_loads.cpp, docs/PERF.md
//            step 26). Prefetching the next steps' B tiles into L1 is not done: 4-8 % slower in the VM's slow
//            state, +10 % or -6 % in its fast one
//   C        four 16 x 16 int32 tiles: rows 0-15 / 16-31 x columns 0-15 / 16-31
// Tiles: tmm0-3 C (row block, column block) = (0,0) (0,1) (1,0) (1,1); tmm4, 5 A rows 0-15 / 16-31; tmm6, 7 B columns
// 0-15 / 16-31. Each 64-k step loads 4 tiles (4 KB) for 4 tdpbusd (65536 MACs).
//
// The tile configuration (which rows each tile has) is loaded by a thread's first micro-kernel call of a GEMM, and
// again where a call's rows differ (t_configured): another library on the same thread (oneDNN's AMX kernels) may
// have loaded its own, or released the tiles, between GEMMs. A call of the last A rows of an M-block (mr < 32)
// configures only the rows that exist, so no tile reads past the panel.
//
// Not built with PQK_VNNI_EMULATE (the sanitizer harness's AVX2-only build, which has no zmm code to share): AMX is
// tested natively, on a CPU that has it (tests/ops, tests/cpu/test_sanitizers.py's native harness).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(PQK_VNNI_EMULATE)

#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vnni,avx512vl,amx-tile,amx-int8")
namespace pqk {
namespace cpu {
namespace amx {

// The zmm pieces this table shares with avx512vnni (A panel, epilogue, W transpose), compiled again here for this
// table's own target.
#include "x86_gemm_zmm.h"

constexpr int kAmxMr = 32;  // A rows per micro-kernel: two A tiles
constexpr int kAmxNr = 32;  // W columns per micro panel: two B tiles
constexpr int64_t kAmxTileBytes = 16 * 64;               // one tile: 16 rows of 64 bytes (A: 16 rows x 64 k; B: 16
                                                          // dword groups (64 k) x 16 columns)
constexpr int64_t kAmxStepBytes = 2 * kAmxTileBytes;     // a micro panel's W per 64-k step
// k per W block, at most, and the rows / panel of an M-block: as the zmm table (docs/PERF.md step 19)
constexpr int64_t kAmxKc = 16384;
constexpr int64_t kAmxRows = 2048;
constexpr int64_t kAmxPanelBytes = 16 << 20;
// Rows per L2 slice, at least (PrefillKernels::min_slice_rows): at 2048 x 14336 -> 4096 only 64 rows of the whole K fit
// L2 beside a panel (163.6 / 185.6 ms); 256-row slices streamed from L3 past one panel at a time ran 151.6 / 162.9
// (docs/PERF.md step 26); K blocks of 3584 with 384-row slices over 256-column chunks (what this value gives with a
// 2 MB L2) 7-15 % faster again at the VM's fast speed (step 27). At K = 4096 (352 rows fit) nothing changes.
constexpr int64_t kAmxMinSliceRows = 256;
// Side-job blocks (32 elements of the next A slice quantized, PfSide) per 64-k step of the tiles: with 2, the M split's
// 2048 x 4096 -> 1024 went from 6.2 to 5.6 ms (1, 4: 5.9, 5.8; docs/PERF.md step 26): the quantize's divisions run on
// the vector units while the tiles multiply, and at 2 most of the next slice is done before its kernels need it.
constexpr int kAmxSideBlocks = 2;

// The configuration this thread's tiles hold, 32 r0 + r1 (amx_configure), or -1: none of ours (amx_flush released
// the tiles). A GEMM's first micro-kernel call on a thread configures the tiles, later calls only when their rows
// change: loading the configuration on every call (a 32 x 32 block of 56-64 k-steps) cost 0-3 % (2.8 % at
// 2048 x 4096 -> 1024, twice; docs/PERF.md step 29). Another library's AMX code (oneDNN's) can run on the thread only
// between GEMMs, and every GEMM ends with amx_flush on every thread that ran tiles (PrefillKernels::flush, at the end
// of each chunk and slice), which resets this.
thread_local int t_configured = -1;

// r0 rows in the first row block (1..16), r1 in the second (0: not used)
inline void amx_configure(int r0, int r1) {
  const int key = 32 * r0 + r1;
  if (key == t_configured) return;
  t_configured = key;
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[1] = c.rows[4] = (uint8_t)r0;          // C (0, x), A rows 0-15
  c.rows[2] = c.rows[3] = c.rows[5] = (uint8_t)r1;          // C (1, x), A rows 16-31
  c.rows[6] = c.rows[7] = 16;                               // B: 16 dword groups = 64 k
  if (r1 == 0) c.colsb[2] = c.colsb[3] = c.colsb[5] = 0;    // an unused tile is rows 0, colsb 0
  _tile_loadconfig(&c);
}

// The epilogue of a tile, deferred: amx_kernel_out leaves its tile's int32 sums here and stores the outputs of the
// previous tile a few rows at a time between its own tile steps, so the conversions and stores run on the vector
// units while the tiles multiply. Done at once, after the tiles, the epilogue left the tiles idle: 2048 x 4096 ->
// 4096 took 27.7 ms with it and 19.1 ms without it (docs/PERF.md step 26). One per thread; what is still pending
// when the driver reaches the end of a chunk of micro panels or of a slice of rows is stored by amx_flush
// (PrefillKernels::flush), before the driver rewrites the column sums or row scales that ep points to.
struct alignas(64) PendingTile {
  int32_t acc[kAmxMr * kAmxNr];  // the tile's sums (row stride kAmxNr)
  PfCols cols[2];                // its column groups' correction, w_scale, bias, mask
  PfOut ep;
  int mr = 0, groups = 0;        // rows, column groups of 16
  int next = 0, units = 0;       // unit u = (row u / groups, group u % groups); stored below `next`
};
thread_local PendingTile t_pending;

// Up to n more units of the pending tile's epilogue.
inline void pending_store(PendingTile& p, int n) {
  const int end = std::min(p.units, p.next + n);
  for (; p.next < end; ++p.next) {
    const int i = p.next / p.groups, j = p.next - i * p.groups;
    pf_store16(_mm512_load_si512((const void*)(p.acc + i * kAmxNr + 16 * j)), p.cols[j], p.ep.a_scale[i],
               p.ep.bias != nullptr, p.ep.out, i * p.ep.ldo + 16 * j, p.ep.t);
  }
}

// PrefillKernels::flush: the pending outputs stored, and the tiles released (tilerelease: the tile state back to its
// initial, empty one), so a thread that leaves the GEMM does not carry 8 KB of live tile data through every context
// switch's save and restore. The next micro-kernel call configures the tiles again, as every call does.
void amx_flush() {
  pending_store(t_pending, t_pending.units);
  _tile_release();
  t_configured = -1;
}

// c_out (row stride ldo_b bytes) = (c_in (row stride ldi_b), or 0 without it) + A . W over `steps` 64-k steps,
// through the tiles. R2: rows 16-31 exist; C2: columns 16-31 matter (the W panel always holds 32 columns, zeros past
// N; with C2 false they are not computed). Between the steps, on the vector units:
//   side (PfSide, kernels_internal.h; or nullptr): kAmxSideBlocks blocks of 32 of the next A slice quantized
//   pend (or nullptr): the previous tile's epilogue, `per` units per step, the rest before c_out is written (c_out
//   may be pend->acc)
template <bool R2, bool C2>
void amx_tiles(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t steps, const int32_t* c_in, int64_t ldi_b,
               int32_t* c_out, int64_t ldo_b, PfSide* side, PendingTile* pend, int per) {
  const PfQuant qc = side ? pf_quant_consts(side->scale, side->qmin, side->qmax) : PfQuant{};
  if (c_in) {
    const char* ci = (const char*)c_in;
    _tile_loadd(0, ci, ldi_b);
    if (C2) _tile_loadd(1, ci + 64, ldi_b);
    if (R2) _tile_loadd(2, ci + 16 * ldi_b, ldi_b);
    if (R2 && C2) _tile_loadd(3, ci + 16 * ldi_b + 64, ldi_b);
  } else {
    _tile_zero(0);
    if (C2) _tile_zero(1);
    if (R2) _tile_zero(2);
    if (R2 && C2) _tile_zero(3);
  }
  const uint8_t* a1 = a + 16 * lda;  // the second 16-row group (pf_a_offset)
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* b = wp + s * kAmxStepBytes;
    _tile_loadd(4, a + kAmxTileBytes * s, 64);
    _tile_loadd(6, b, 64);
    if (C2) _tile_loadd(7, b + kAmxTileBytes, 64);
    _tile_dpbusd(0, 4, 6);
    if (C2) _tile_dpbusd(1, 4, 7);
    if (R2) {
      _tile_loadd(5, a1 + kAmxTileBytes * s, 64);
      _tile_dpbusd(2, 5, 6);
      if (C2) _tile_dpbusd(3, 5, 7);
    }
    if (pend) pending_store(*pend, per);
    if (side)
      for (int k = 0; k < kAmxSideBlocks && side->n32 > 0; ++k) pf_side_block(*side, qc);
  }
  if (pend) pending_store(*pend, pend->units);
  char* co = (char*)c_out;
  _tile_stored(0, co, ldo_b);
  if (C2) _tile_stored(1, co + 64, ldo_b);
  if (R2) _tile_stored(2, co + 16 * ldo_b, ldo_b);
  if (R2 && C2) _tile_stored(3, co + 16 * ldo_b + 64, ldo_b);
}

// c_out[0:mr, 0:nr] (row stride ldo int32) = (c_in[0:mr, 0:nr] (row stride ldi) if given) + the micro-kernel over kq
// dword groups (rounded up to whole 64-k steps: the panels are zero-padded there).
void amx_run(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, const int32_t* c_in,
             int64_t ldi, int32_t* c_out, int64_t ldo, PfSide* side, PendingTile* pend) {
  const int r0 = std::min(mr, 16), r1 = mr - r0;
  amx_configure(r0, r1);
  const int64_t steps = (kq + 15) / 16;
  const int per = pend ? (int)((pend->units - pend->next + steps - 1) / steps) : 0;
  const int64_t li = ldi * 4, lo = ldo * 4;
  if (r1 > 0) {
    if (nn > 16) return amx_tiles<true, true>(a, lda, wp, steps, c_in, li, c_out, lo, side, pend, per);
    return amx_tiles<true, false>(a, lda, wp, steps, c_in, li, c_out, lo, side, pend, per);
  }
  if (nn > 16) return amx_tiles<false, true>(a, lda, wp, steps, c_in, li, c_out, lo, side, pend, per);
  amx_tiles<false, false>(a, lda, wp, steps, c_in, li, c_out, lo, side, pend, per);
}

void amx_kernel(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, int32_t* c, int64_t ldc,
                bool accumulate) {
  amx_run(a, lda, wp, kq, mr, nn, accumulate ? c : nullptr, ldc, c, ldc, nullptr, nullptr);
}

// The last K block: the tiles (from c's partial sums if accumulate) into this thread's pending tile, whose previous
// contents' epilogue runs between the steps (PendingTile); the side job (ep.side) too, PrefillKernels::side finishes
// it. This tile's outputs are stored by the next call, or by amx_flush.
void amx_kernel_out(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, const int32_t* c,
                    int64_t ldc, bool accumulate, const PfOut& ep) {
  PendingTile& p = t_pending;
  amx_run(a, lda, wp, kq, mr, nn, accumulate ? c : nullptr, ldc, p.acc, kAmxNr, ep.side, &p);
  p.ep = ep;
  p.ep.side = nullptr;
  p.mr = mr;
  p.groups = (nn + 15) / 16;
  for (int j = 0; j < p.groups; ++j) p.cols[j] = pf_cols(ep.colsum, ep.w_scale, ep.bias, 16 * j, ep.nn);
  p.next = 0;
  p.units = mr * p.groups;
}

// One micro panel, tiled (pf_pack_w_t<32, true>), its dword groups zero past the block's k up to a whole 64-k step:
// the last step's two tiles are zeroed first, then written over where k exists.
void amx_pack_w(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc, int8_t* dst,
                int32_t* colsum) {
  const int64_t steps = ((kc + 3) / 4 + 15) / 16;
  memset(dst + (steps - 1) * kAmxStepBytes, 0, kAmxStepBytes);
  pf_pack_w_t<kAmxNr, true>(w, w_bits, w_stride, n0, nn, k0, kc, dst, colsum);
}

const PrefillKernels kPrefill = {kAmxMr, kAmxNr, kAmxKc, kAmxRows, kAmxPanelBytes,
                                 /*w8=*/true, amx_pack_w, amx_kernel, nullptr, amx_kernel_out,
                                 pf_pack_a_float, pf_pack_a_int8, pf_pack_a_int4, pf_side, /*l2_blocks=*/true, kAmxMinSliceRows,
                                 /*k_align=*/64, amx_flush, /*a_tiled=*/true,
                                 /*m_split_tiled=*/false, /*small_m=*/8};

}  // namespace amx
}  // namespace cpu
}  // namespace pqk
#pragma GCC pop_options

namespace pqk {
namespace cpu {

// AMX-TILE and AMX-INT8 in cpuid (leaf 7: EDX bits 24, 25), and the kernel's permission to use the tile data state:
// Linux enables it per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA = 18); without it
// the first tile instruction faults.
static bool amx_usable() {
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;
#ifdef SYS_arch_prctl
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

const IsaKernels* amx_kernels() {
  static const IsaKernels* k = []() -> const IsaKernels* {
    const IsaKernels* base = avx512vnni_kernels();
    if (!base || !base->prefill || !amx_usable()) return nullptr;
    static IsaKernels t = *base;
    t.name = "amx";
    t.prefill = &amx::kPrefill;
    return &t;
  }();
  return k;
}

}  // namespace cpu
}  // namespace pqk

#else  // not x86-64, or the emulated build

#include "kernels_internal.h"
namespace pqk {
namespace cpu {
const IsaKernels* amx_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace pqk

#endif
