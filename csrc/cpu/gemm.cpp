// The CPU GEMM driver: blocking, threading, the A panel (where a float A is quantized), the dequant
// epilogue. The inner products are the instruction-set tiles (kernels_internal.h).
//
//   for each block of MB rows of A (serial):
//     build the int8 panel of those rows              (parallel over rows; fused quantize for float A)
//     for each block of W tiles (parallel over N):    packed W block (<= kWBlockBytes) stays in L2 while ...
//       for each tile of mr panel rows:               ... each A tile (in L1) passes over it
//         for each tile of nr W rows in the block:
//           int32 tile -> y = acc * (a_scale * w_scale) + bias -> out dtype
//
// Why this order: W is the big operand (N*K/2 bytes, e.g. 8 MB at 4096x4096) and is read from memory
// once per M-block; inside a block the operand re-read from L2 is packed W (half a byte per k) rather
// than the int8 panel (docs/PERF.md, step 2). At decode there is one M-block and W streams exactly once.
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <new>
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

namespace {

constexpr int64_t kPanelBytes = 256 * 1024;   // A panel per M-block: a quarter of a 1 MB L2
constexpr int64_t kWBlockBytes = 128 * 1024;  // W tiles revisited by every A tile (docs/PERF.md, step 2)


// Row m of A -> panel row (kp int8, order per W's bits, zero padded); returns the row's scale.
float build_panel_row(const GemmArgs& g, const IsaKernels& ker, int64_t m, int64_t kp, int8_t* dst,
                      int8_t* tmp /* int8 [K] scratch */, bool split) {
  const int64_t K = g.K;
  float scale = 0.0f;
  if (g.a_source != ASource::kFloat) scale = g.a_scale_per_row ? g.a_scale[m] : g.a_scale[0];

  if (g.a_source == ASource::kPacked4 && split) {
    // Packed int4 is already "nibble split": byte j of a 32-byte chunk holds k = 2j and 2j + 1.
    const uint8_t* p = (const uint8_t*)g.a + m * (K / 2);
    memset(dst, 0, (size_t)kp);
    for (int64_t b = 0; b < K / 2; ++b) {
      const int64_t c = (b / 32) * kChunk, j = b % 32;
      dst[c + j] = low_nibble(p[b]);
      dst[c + 32 + j] = high_nibble(p[b]);
    }
    return scale;
  }

  const int8_t* q = tmp;  // natural-order int8 row
  switch (g.a_source) {
    case ASource::kPacked4:
      unpack_int4((const uint8_t*)g.a + m * (K / 2), K / 2, tmp);  // serial: K is small
      break;
    case ASource::kInt8:
      q = (const int8_t*)g.a + m * K;
      break;
    case ASource::kFloat: {
      const void* x = (const char*)g.a + m * K * float_type_size(g.a_float_type);
      const int qmax = qmax_for_bits(g.a_bits);
      scale = g.a_scale ? g.a_scale[0] : per_token_scale_from_amax(ker.row_amax(x, g.a_float_type, K), qmax);
      ker.quantize_row(x, g.a_float_type, K, scale, qmin_for_bits(g.a_bits), qmax, tmp);
      break;
    }
  }
  if (split) {
    ker.split_row(q, K, dst);
  } else {
    memcpy(dst, q, (size_t)K);
    memset(dst + K, 0, (size_t)(kp - K));
  }
  return scale;
}

// ---- prefill (M >= kPrefillMinM) on an ISA with PrefillKernels ---------------------------------------------------
//   for each M-block of up to pk.rows rows and pk.panel_bytes of A (serial):
//     build the uint8 panel (natural order, a + 128; the fused quantize for a float A)     parallel over rows
//     for each micro panel (nr W columns) of this thread's column range:                   parallel over N
//       for each K block of up to pk.kc:
//         unpack W [micro panel, K block] once (int4 -> int8 in the kernel's layout, + column sums)
//         for each A tile of mr rows of the M-block: micro-kernel into c (int32)
//         last K block: the epilogue of each tile straight from the kernel's accumulators (kernel_out)
// W is unpacked once per M-block and reused by all its rows (not once per tile); threads split N, so both share
// the A panel and each unpacks only its own W. The blocks are as large as the caches allow (docs/PERF.md step 19):
// on zmm one K block holds up to 16384 k (the unpacked micro panel, 48 x K bytes, streams from L2; no int32 partial
// sums go back and forth through c), and one M-block up to 2048 rows (W unpacked once per 2048 rows): pk.kc, pk.rows.
// Where all of W, unpacked, is small (a GQA k / v projection) the threads split M instead: gemm_prefill_msplit.
constexpr int64_t kPrefillMinM = 64;
constexpr int64_t kSmallWBytes = 4 << 20;        // all of W unpacked (N x K int8), at most, for PrefillKernels::small_m
constexpr int64_t kSmallMAnyW = 32;               // rows from which a table with small_m > 0 takes any W (PERF step 31)
constexpr int64_t kPfUnit = 16;                   // columns: the grain of the threads' N split (one zmm of int32)
constexpr int64_t kMSplitWBytes = 8 << 20;        // all of W unpacked, at most, for the M split (1/4 of a 32 MB L3)

// n split into the fewest blocks of at most `cap` (>= 1), of equal size rounded up to `mult`: K = 14336 with
// cap 16384 is one block, M = 2100 with cap 2048 two of 1056 rows (not 2048 + 52, which unpacks W twice for 52 rows).
int64_t balanced_block(int64_t n, int64_t cap, int64_t mult) {
  const int64_t blocks = (n + cap - 1) / cap;
  return round_up((n + blocks - 1) / blocks, mult);
}

// Tests and tuning only: PQK_PREFILL_KC (k per W block, rounded up to PrefillKernels::k_align) and PQK_PREFILL_ROWS
// (rows per M-block) replace the defaults, so small shapes cross many block boundaries (tests/ops/test_gemm_blocking.py).
int64_t env_int(const char* name, int64_t dflt) {
  const char* v = getenv(name);
  const long long x = v ? atoll(v) : 0;
  return x > 0 ? (int64_t)x : dflt;
}

// The L2 size per core (sysconf), 1 MB when unknown; clamped to [256 KB, 4 MB].
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? std::min<int64_t>(std::max<int64_t>(v, 256 << 10), 4 << 20) : (int64_t)(1 << 20);
  }();
  return bytes;
}

// Grow-only, 64-byte aligned scratch kept per thread across calls (slot: one buffer per use). A prefill GEMM's A panel
// (up to PrefillKernels::panel_bytes) and its per-thread c block, allocated afresh per call, were page-faulted in every time:
// ~2900 faults per 2048x4096->1024 call, a few % of its time (docs/PERF.md step 19). Held until the thread exits.
enum ScratchSlot { kScratchPanel = 0, kScratchW = 1, kScratchC = 2, kScratchColsum = 3, kScratchSlots = 4 };
template <class T>
T* thread_scratch(ScratchSlot slot, size_t n) {
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buf() { free(p); }
  };
  static thread_local Buf bufs[kScratchSlots];
  Buf& b = bufs[slot];
  const size_t bytes = (size_t)round_up((int64_t)(std::max<size_t>(n, 1) * sizeof(T)), 64);
  if (bytes > b.bytes) {
    free(b.p);
    b.p = aligned_alloc(64, bytes);
    b.bytes = b.p ? bytes : 0;
    if (!b.p) throw std::bad_alloc();
  }
  return (T*)b.p;
}

// The portable pack_a_int8 (PrefillKernels): q int8 [K] -> the panel row's K blocks as a + 128, 0x80 past K.
void pack_a_int8_portable(const int8_t* q, int64_t K, int64_t kc, int64_t bstride, bool tiled, uint8_t* dst) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kc, ++b) {
    uint8_t* d = dst + b * bstride;
    const int64_t n = std::min(kc, K - k0);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {  // 8 bytes at a time (within one 64-k piece): the XOR flips every sign bit
      uint64_t v;
      memcpy(&v, q + k0 + k, 8);
      v ^= 0x8080808080808080ull;
      memcpy(d + pf_a_offset(0, k, kc, tiled), &v, 8);
    }
    for (; k < kc; ++k) d[pf_a_offset(0, k, kc, tiled)] = k < n ? (uint8_t)q[k0 + k] ^ 0x80 : 0x80;
  }
}

// Row m of A -> its panel row (K blocks of kc at dst + b * bstride, each byte a + 128, 0x80 past K; dst the row's
// pf_a_offset in the block, in the panel's layout: tiled or row-major); for a float A the fused quantize (the row is
// read once, straight into the panel). Returns the row's scale. tmp: scratch for a row that must first be made in
// natural int8 order.
float pack_prefill_row(const GemmArgs& g, const IsaKernels& ker, int64_t m, int64_t kc, int64_t bstride, bool tiled,
                       uint8_t* dst, std::vector<int8_t>& tmp) {
  const PrefillKernels& pk = *ker.prefill;
  const int64_t K = g.K;
  const auto pack_a_int8 = pk.pack_a_int8 ? pk.pack_a_int8 : pack_a_int8_portable;
  float scale = 0.0f;
  if (g.a_source != ASource::kFloat) scale = g.a_scale_per_row ? g.a_scale[m] : g.a_scale[0];
  if (g.a_source == ASource::kInt8) {
    pack_a_int8((const int8_t*)g.a + m * K, K, kc, bstride, tiled, dst);
  } else if (g.a_source == ASource::kPacked4 && pk.pack_a_int4) {
    pk.pack_a_int4((const uint8_t*)g.a + m * (K / 2), K, kc, bstride, tiled, dst);
  } else if (g.a_source == ASource::kPacked4) {
    tmp.resize((size_t)K);
    unpack_int4((const uint8_t*)g.a + m * (K / 2), K / 2, tmp.data());
    pack_a_int8(tmp.data(), K, kc, bstride, tiled, dst);
  } else {
    const void* x = (const char*)g.a + m * K * float_type_size(g.a_float_type);
    const int qmin = qmin_for_bits(g.a_bits), qmax = qmax_for_bits(g.a_bits);
    scale = g.a_scale ? g.a_scale[0] : per_token_scale_from_amax(ker.row_amax(x, g.a_float_type, K), qmax);
    if (pk.pack_a_float) {
      pk.pack_a_float(x, g.a_float_type, K, scale, qmin, qmax, kc, bstride, tiled, dst);
    } else {
      tmp.resize((size_t)K);
      ker.quantize_row(x, g.a_float_type, K, scale, qmin, qmax, tmp.data());
      pack_a_int8(tmp.data(), K, kc, bstride, tiled, dst);
    }
  }
  return scale;
}

// The last K block of one A tile: the kernel with the epilogue straight from its accumulators, or (a table without
// kernel_out) the kernel into c, then the epilogue.
inline void prefill_tile_out(const PrefillKernels& pk, const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq,
                             int mm, int nn, int32_t* c, int64_t ldc, bool accumulate, const PfOut& ep) {
  if (pk.kernel_out) {
    pk.kernel_out(a, lda, wp, kq, mm, nn, c, ldc, accumulate, ep);
  } else {
    pk.kernel(a, lda, wp, kq, mm, nn, c, ldc, accumulate);
    pk.epilogue(c, ldc, mm, nn, ep.colsum, ep.a_scale, ep.w_scale, ep.bias, ep.out, ep.ldo, ep.t);
  }
}

// Threads split M (gemm_prefill below, when all of W, unpacked, is small): W is unpacked once into one buffer all
// threads share (its micro panels split over the threads), then each thread runs its own rows of A, one L2 slice of
// at most `sub_rows` at a time, every micro panel over the slice before the next slice. No panel of all M rows goes
// through memory, and no thread waits for another between slices.
// An int8 or packed int4 A, or a bf16 x with a static scale (and K a multiple of 32), is built inside the micro-kernel:
// while the kernels run over slice s, they build slice s + 1 into a second buffer as their side job (PfSide,
// kernels_internal.h), on the pipes the kernel leaves idle; what they leave undone is finished right after
// (PrefillKernels::side). Each slice takes the L2 room of one (the two together are more than L2): W streams from L3
// once per slice, and on the Zen 5 slices of 144 rows at K = 4096 ran 1-5 % faster than two sharing that room
// (64 rows) at every M-split shape measured (docs/PERF.md step 39). Otherwise each slice is built right before its
// kernels.
void gemm_prefill_msplit(const GemmArgs& g, const IsaKernels& ker, int64_t kc, int64_t sub_rows) {
  const PrefillKernels& pk = *ker.prefill;
  const int64_t M = g.M, N = g.N, K = g.K;
  const int64_t w_stride = g.w_bits == 4 ? K / 2 : K;
  const int mr = pk.mr, nr = pk.nr;
  // kc: K rounded up to pk.k_align (the panel rows' stride); the kernels run over ceil(K / 4) k-steps, as pack_w fills
  // them
  const int64_t kq = (K + 3) / 4, w_panel = (kc + 3) / 4 * 4 * nr, n_panels = (N + nr - 1) / nr;
  // The side job takes int8 and packed int4 A, and a bf16 x with a static scale (the other float A: a per-token
  // scale needs the whole row first; fp16 / fp32 would need their own 32-element quantize).
  const bool side_source = g.a_source != ASource::kFloat ||
                           (g.a_float_type == FloatType::kBFloat16 && g.a_scale != nullptr);
  const bool fuse = pk.side && pk.kernel_out && side_source && K % 32 == 0 && kc == K;
  const int64_t a_row_bytes = g.a_source == ASource::kPacked4 ? K / 2
                              : g.a_source == ASource::kInt8  ? K
                                                              : K * float_type_size(g.a_float_type);
  // The slices' layout: the table's, or tiled where it asks for that here (PrefillKernels::m_split_tiled, which
  // kernel_out then reads from PfOut::a_tiled); rows in whole 16-row groups where tiled.
  const bool tiled = pk.a_tiled || (pk.m_split_tiled && pk.kernel_out && kc % 64 == 0);
  const int64_t rmult = tiled ? std::max(mr, 16) : mr;
  const int64_t rows_cap = fuse ? std::max<int64_t>(rmult, sub_rows / rmult * rmult) : std::max(rmult, sub_rows);
  int8_t* wbuf = thread_scratch<int8_t>(kScratchW, (size_t)(n_panels * w_panel));  // shared, the caller's
  std::vector<int32_t> colsum((size_t)(n_panels * nr), 0);
  parallel_for(0, n_panels, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      pk.pack_w(g.w, g.w_bits, w_stride, p * nr, (int)std::min<int64_t>(nr, N - p * nr), 0, K, wbuf + p * w_panel,
                colsum.data() + p * nr);
  });
  parallel_for(0, (M + mr - 1) / mr, 1, [&](int64_t ub, int64_t ue) {
    const int64_t rb = ub * mr, re = std::min(M, ue * mr);  // this thread's rows [rb, re)
    const int64_t rows = balanced_block(re - rb, rows_cap, rmult);
    uint8_t* panel = thread_scratch<uint8_t>(kScratchPanel, (size_t)((fuse ? 2 : 1) * rows * kc));
    int32_t* cbuf = pk.kernel_out ? nullptr : thread_scratch<int32_t>(kScratchC, (size_t)(mr * nr));
    std::vector<float> rscale((size_t)rows);
    std::vector<int8_t> tmp;
    auto build = [&](int64_t r0, int64_t r1, uint8_t* dst) {  // rows [r0, r1) -> dst, the slice's buffer
      for (int64_t r = r0; r < r1; ++r)
        rscale[r - r0] =
            pack_prefill_row(g, ker, r, kc, rows * kc, tiled, dst + pf_a_offset(r - r0, 0, kc, tiled), tmp);
    };
    for (int64_t r0 = rb, sl = 0; r0 < re; r0 += rows, ++sl) {
      const int64_t r1 = std::min(re, r0 + rows);  // this slice's rows [r0, r1)
      uint8_t* cur = panel + (fuse ? sl % 2 : 0) * rows * kc;
      if (!fuse || sl == 0) {
        build(r0, r1, cur);
      } else {  // built by the side job: the row scales as pack_prefill_row gives them (a static bf16 x's is given)
        for (int64_t r = r0; r < r1; ++r) rscale[r - r0] = g.a_scale_per_row ? g.a_scale[r] : g.a_scale[0];
      }
      PfSide side = {};
      const int64_t n1 = std::min(re, r1 + rows);  // the next slice's rows [r1, n1)
      if (fuse && r1 < re) {
        side = {(const char*)g.a + r1 * a_row_bytes, g.a_source, panel + ((sl + 1) % 2) * rows * kc, 0, 0, kc,
                tiled, (n1 - r1) * K / 32, g.a_scale[0], qmin_for_bits(g.a_bits), qmax_for_bits(g.a_bits)};
      }
      for (int64_t p = 0; p < n_panels; ++p) {
        const int64_t n0 = p * nr;
        const int nn = (int)std::min<int64_t>(nr, N - n0);
        for (int64_t i0 = r0; i0 < r1; i0 += mr) {
          PfOut ep = {colsum.data() + n0, rscale.data() + (i0 - r0), g.w_scale + n0, g.bias ? g.bias + n0 : nullptr,
                      (char*)g.out + (i0 * N + n0) * float_type_size(g.out_type), N, g.out_type, nn};
          if (side.n32 > 0) ep.side = &side;
          ep.a_tiled = tiled;
          prefill_tile_out(pk, cur + pf_a_offset(i0 - r0, 0, kc, tiled), kc, wbuf + p * w_panel, kq,
                           (int)std::min<int64_t>(mr, r1 - i0), nn, cbuf, nr, false, ep);
        }
      }
      if (pk.flush) pk.flush();  // this slice's last outputs, before its row scales are rewritten
      if (side.n32 > 0) pk.side(side);  // what the kernels left of the next slice
    }
  });
}

void gemm_prefill(const GemmArgs& g, const IsaKernels& ker) {
  const PrefillKernels& pk = *ker.prefill;
  const int64_t M = g.M, N = g.N, K = g.K;
  const int64_t w_stride = g.w_bits == 4 ? K / 2 : K;
  const int mr = pk.mr, nr = pk.nr;
  // block sizes: the environment's as given (tests), else the fewest blocks the caps allow, evened out
  const int64_t kc_env = env_int("PQK_PREFILL_KC", 0), rows_env = env_int("PQK_PREFILL_ROWS", 0);
  const int64_t ka = pk.k_align;
  int64_t kc_max = kc_env ? std::min(round_up(kc_env, ka), round_up(K, ka)) : balanced_block(K, pk.kc, ka);
  // Long K on a table with min_slice_rows (AMX): where fewer rows of the whole K than that fit in 3/4 of L2 beside
  // a micro panel, K blocks of at most L2 / (2 min_slice_rows), so that a slice of rows and a chunk of panels fit
  // together (the L2 sub-blocks below).
  const bool long_k = pk.l2_blocks && pk.min_slice_rows > 0 &&
                      l2_cache_bytes() * 3 / 4 / kc_max - pk.nr < pk.min_slice_rows;
  if (!kc_env && long_k)
    kc_max = balanced_block(K, std::max(ka, l2_cache_bytes() / (2 * pk.min_slice_rows) / ka * ka), ka);
  const int64_t n_kb = (K + kc_max - 1) / kc_max, kpad = n_kb * kc_max;
  const int64_t rows_cap = std::min<int64_t>(pk.rows, std::max<int64_t>(mr, pk.panel_bytes / kpad / mr * mr));
  const int64_t mb_max = std::min(M, rows_env ? rows_env : balanced_block(M, rows_cap, mr));
  const int64_t kq_max = (kc_max + 3) / 4;
  const int64_t n_units = (N + kPfUnit - 1) / kPfUnit;

  // The A panel of an M-block, blocked by K: block b = rows [mb_max, kc_max] of k in [b kc_max, (b+1) kc_max), so a
  // micro-kernel's A tile (mr x kc_max) is contiguous and one K block of all rows is one sequential stream (rows
  // a full K apart gave the prefetchers mr short streams per kernel call).
  // Where a_tiled, its 16-row groups are whole (a partial last group's tiles are read only in the rows that exist).
  const int64_t bstride = round_up(mb_max, 16) * kc_max;
  // L2 sub-blocks (PrefillKernels::l2_blocks): A rows of a slice = what fits in 3/4 of L2 beside one micro panel
  // (nr x K bytes of unpacked W); a chunk of micro panels unpacked at once holds up to 2 MB. Without them a
  // 2048 x 4096 A panel (8 MB) streamed from L3 once per micro panel ran the micro-kernel at 89 % of the peak, a
  // 128-row one (512 KB, in L2) at 96 % (docs/PERF.md step 20). Long K (14336: 672 KB per micro panel) leaves no
  // room: the whole M-block per micro panel, as before, except on a table with min_slice_rows, whose K blocks (above)
  // make room. PQK_PREFILL_SUBROWS / PQK_PREFILL_CHUNK (tests, tuning) force the slice rows and chunk columns.
  const int64_t w_panel = kq_max * 4 * nr;  // bytes of one unpacked micro panel's K block
  int64_t sub_rows = mb_max, chunk = nr;
  if (pk.l2_blocks && (n_kb == 1 || pk.min_slice_rows > 0)) {
    const int64_t fit = l2_cache_bytes() * 3 / 4 / kc_max - nr;
    if (fit >= std::max<int64_t>(64, pk.min_slice_rows)) {
      sub_rows = fit / mr * mr;
      chunk = std::max<int64_t>(nr, (2 << 20) / w_panel * nr);
      // with K blocks the int32 partial sums (slice rows x chunk columns) go through memory: min_slice_rows columns
      // at most, 384 KB at 384 rows
      if (n_kb > 1) chunk = std::min(chunk, std::max<int64_t>(nr, round_up(pk.min_slice_rows, nr)));
    } else if (pk.min_slice_rows > 0) {  // one long K block forced (PQK_PREFILL_KC): the slice streams past one panel
      sub_rows = round_up(pk.min_slice_rows, mr);
    }
  }
  if (const int64_t r = env_int("PQK_PREFILL_SUBROWS", 0)) sub_rows = round_up(r, mr);
  if (const int64_t c = env_int("PQK_PREFILL_CHUNK", 0)) chunk = round_up(c, nr);
  // Threads split M instead (gemm_prefill_msplit) where the slices exist and all of W, unpacked, is small enough to be
  // re-read from L3 by every slice of every thread (kMSplitWBytes): 2048 x 4096 -> 1024 (W 4 MB unpacked) went from
  // 0.96-0.97x to ~1.0x raw _int_mm with it (docs/PERF.md step 24). PQK_PREFILL_SPLIT=m / n (tests, tuning) forces
  // one (m with one K block only).
  const char* split = getenv("PQK_PREFILL_SPLIT");
  const bool small_w = (N + nr - 1) / nr * w_panel <= kMSplitWBytes;
  if (n_kb == 1 && (split ? split[0] == 'm' : pk.l2_blocks && sub_rows < mb_max && small_w)) {
    gemm_prefill_msplit(g, ker, kc_max, sub_rows);
    return;
  }
  uint8_t* panel = thread_scratch<uint8_t>(kScratchPanel, (size_t)(n_kb * bstride));
  std::vector<float> rscale((size_t)mb_max);
  for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
    const int64_t mb = std::min(mb_max, M - m0);
    parallel_for(0, mb, 1, [&](int64_t b, int64_t e) {
      std::vector<int8_t> tmp;  // a row in natural int8 order, where it must be made first
      for (int64_t r = b; r < e; ++r)
        rscale[r] =
            pack_prefill_row(g, ker, m0 + r, kc_max, bstride, pk.a_tiled, panel + pf_a_offset(r, 0, kc_max, pk.a_tiled),
                             tmp);
    });
    // Threads split N in units of 16 columns (one zmm), each thread's range cut into micro panels of nr from its
    // start: N = 1024 on 2 threads is 10 2/3 micro panels each, not 11 and 10 1/3 (the kernel skips a partial
    // panel's zero columns, so whole panels per thread left one thread waiting at the barrier).
    // A thread unpacks `chunk` columns of micro panels (all their K blocks) at once, then runs them over the
    // M-block one slice of `rows` rows at a time (L2 sub-blocks; without them rows = mb and chunk = nr).
    const int64_t rows = std::min(mb, balanced_block(mb, sub_rows, mr));
    // Without slices (one micro panel per chunk, the whole M-block) each K block of W is unpacked right before its
    // tiles use it, into one block of scratch (still in L1/L2 when the kernel reads it); with them, the chunk's
    // micro panels are unpacked ahead, every K block, and reused by every slice.
    const bool ahead = chunk > nr || rows < mb;
    parallel_for(0, n_units, 1, [&](int64_t ub, int64_t ue) {
      const int64_t nb = ub * kPfUnit, ne = std::min(N, ue * kPfUnit);  // this thread's columns [nb, ne)
      const int64_t chunk_panels = (std::min(chunk, ne - nb) + nr - 1) / nr;
      int8_t* wbuf = thread_scratch<int8_t>(kScratchW, (size_t)(ahead ? chunk_panels * n_kb * w_panel : w_panel));
      int32_t* colsum = thread_scratch<int32_t>(kScratchColsum, (size_t)(chunk_panels * nr));
      // int32 partial sums between K blocks (and for a table without kernel_out), a slice's rows x the chunk's
      // columns (row stride ldc); none with one K block and kernel_out
      const int64_t ldc = chunk_panels * nr;
      int32_t* cbuf = n_kb > 1 || !pk.kernel_out ? thread_scratch<int32_t>(kScratchC, (size_t)(rows * ldc)) : nullptr;
      for (int64_t c0 = nb; c0 < ne; c0 += chunk) {
        const int64_t ce = std::min(ne, c0 + chunk);  // this chunk's columns [c0, ce)
        memset(colsum, 0, (size_t)(chunk_panels * nr) * sizeof(int32_t));
        for (int64_t n0 = c0, p = 0; ahead && n0 < ce; n0 += nr, ++p) {
          const int nn = (int)std::min<int64_t>(nr, ce - n0);
          for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kc_max, ++kb)
            pk.pack_w(g.w, g.w_bits, w_stride, n0, nn, k0, std::min(kc_max, K - k0), wbuf + (p * n_kb + kb) * w_panel,
                      colsum + p * nr);
        }
        // Per slice, K block by K block, every micro panel of the chunk over the slice's rows: the slice's K block of
        // A (rows x kc) is reused by all the chunk's panels and each panel's K block by all the slice's rows, from L2
        // where both fit (long K with K blocks, docs/PERF.md step 27). Without slices (one panel, the whole M-block)
        // the same order is each K block of the one panel unpacked right before its tiles.
        for (int64_t r0 = 0; r0 < mb; r0 += rows) {
          const int64_t re = std::min(mb, r0 + rows);  // this slice's rows [r0, re) of the M-block
          for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kc_max, ++kb) {
            const int64_t kc = std::min(kc_max, K - k0), kq = (kc + 3) / 4;
            const bool last = k0 + kc >= K;
            for (int64_t n0 = c0, p = 0; n0 < ce; n0 += nr, ++p) {
              const int nn = (int)std::min<int64_t>(nr, ce - n0);
              const int8_t* wp = ahead ? wbuf + (p * n_kb + kb) * w_panel : wbuf;
              if (!ahead) pk.pack_w(g.w, g.w_bits, w_stride, n0, nn, k0, kc, wbuf, colsum + p * nr);
              for (int64_t i0 = r0; i0 < re; i0 += mr) {
                const int mm = (int)std::min<int64_t>(mr, re - i0);
                int32_t* c = cbuf ? cbuf + (i0 - r0) * ldc + p * nr : nullptr;
                const uint8_t* a = panel + kb * bstride + pf_a_offset(i0, 0, kc_max, pk.a_tiled);
                if (!last) {
                  pk.kernel(a, kc_max, wp, kq, mm, nn, c, ldc, k0 > 0);
                  continue;
                }
                const PfOut ep = {colsum + p * nr, rscale.data() + i0, g.w_scale + n0, g.bias ? g.bias + n0 : nullptr,
                                  (char*)g.out + ((m0 + i0) * N + n0) * float_type_size(g.out_type), N, g.out_type, nn};
                prefill_tile_out(pk, a, kc_max, wp, kq, mm, nn, c, ldc, k0 > 0, ep);
              }
            }
          }
        }
        if (pk.flush) pk.flush();  // this chunk's last outputs, before its column sums are reset
      }
    });
  }
}

// acc int32 [mm, nn] of rows row0.. and columns n0.. -> y = acc * (row scale * w_scale) + bias -> g.out
inline void store_tile(const GemmArgs& g, int64_t row0, int64_t n0, int mm, int nn, const int32_t* acc,
                       const float* rscale /* fp32 [mm] */) {
  for (int i = 0; i < mm; ++i) {
    for (int j = 0; j < nn; ++j) {
      float y = dequant_value(acc[i * nn + j], rscale[i], g.w_scale[n0 + j]);
      if (g.bias) y += g.bias[n0 + j];
      store_from_f32(g.out, (row0 + i) * g.N + n0 + j, y, g.out_type);
    }
  }
}

// W tiles per parallel task: enough work to amortize scheduling, ~64 KB of W
inline int64_t decode_tile_grain(int nr, int64_t w_stride) {
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, nr * w_stride));
}

// Whether b's A row quantizes exactly as a's: the same float source and bits, and the same static scale (or both
// dynamic per token, which derives the scale from the same row).
bool same_a_quantization(const GemmArgs& a, const GemmArgs& b) {
  if (a.a_source != ASource::kFloat || b.a_source != ASource::kFloat || a.a != b.a ||
      a.a_float_type != b.a_float_type || a.a_bits != b.a_bits || a.K != b.K)
    return false;
  if (!a.a_scale || !b.a_scale) return !a.a_scale && !b.a_scale;
  return a.a_scale[0] == b.a_scale[0];
}

}  // namespace

void gemm_shared_a(const GemmArgs* gs, int n, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  bool fused = n > 1;
  for (int i = 0; i < n && fused; ++i)
    fused = gs[i].M == 1 && gs[i].N > 0 && gs[i].K == gs[0].K && gs[i].w_bits == gs[0].w_bits &&
            gs[i].a_source == ASource::kFloat;
  if (!fused) {
    for (int i = 0; i < n; ++i) gemm(gs[i], isa);
    return;
  }
  // As gemm()'s decode path (one A row), with the W tiles of all n GEMMs in one parallel region: a small
  // projection (SmolLM2's k / v: 192 x 576, 55 KB) is one task on one thread when alone, and each call would open
  // and join its own region; the row is quantized once per distinct scale (q, k, v share their input's).
  const int64_t K = gs[0].K, kp = round_up(std::max<int64_t>(K, 1), kChunk);
  const bool w4 = gs[0].w_bits == 4;
  const int64_t w_stride = w4 ? K / 2 : K;
  const int nr = w4 ? ker.nr_decode : ker.nr_max;
  std::vector<int8_t> panel((size_t)(n * kp)), tmp((size_t)std::max<int64_t>(K, 1));
  std::vector<int32_t> rowsum((size_t)n);
  std::vector<float> rscale((size_t)n);
  std::vector<int> src((size_t)n);            // GEMM i reads the A panel row of GEMM src[i] <= i
  std::vector<int64_t> first((size_t)n + 1);  // GEMM i owns tiles [first[i], first[i + 1])
  first[0] = 0;
  for (int i = 0; i < n; ++i) {
    src[i] = i;
    for (int j = 0; j < i; ++j) {
      if (same_a_quantization(gs[j], gs[i])) {
        src[i] = src[j];
        break;
      }
    }
    if (src[i] == i) {
      rscale[i] = build_panel_row(gs[i], ker, 0, kp, panel.data() + i * kp, tmp.data(), w4);
      rowsum[i] = ker.row_sum(panel.data() + i * kp, kp);
    }
    first[i + 1] = first[i] + (gs[i].N + nr - 1) / nr;
  }
  parallel_for(0, first[n], decode_tile_grain(nr, w_stride), [&](int64_t tb, int64_t te) {
    int32_t acc[16 * 16];
    int i = 0;
    for (int64_t t = tb; t < te; ++t) {
      while (t >= first[i + 1]) ++i;
      const GemmArgs& g = gs[i];
      const int s = src[i];
      const int64_t n0 = (t - first[i]) * nr;
      const int nn = (int)std::min<int64_t>(nr, g.N - n0);
      const void* w_tile = (const char*)g.w + n0 * w_stride;
      if (w4) {
        ker.tile_w4(panel.data() + s * kp, kp, &rowsum[s], g.a_bits, (const uint8_t*)w_tile, w_stride, K, 1, nn, acc);
      } else {
        ker.tile_w8(panel.data() + s * kp, kp, (const int8_t*)w_tile, w_stride, K, 1, nn, acc);
      }
      store_tile(g, 0, n0, 1, nn, acc, &rscale[s]);
    }
  });
}

void gemm(const GemmArgs& g, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t M = g.M, N = g.N, K = g.K;
  if (M == 0 || N == 0) return;
  // prefill: the ISA's own W layout, unpacked once per panel (the gather offsets of pack_w are int32); from which M
  // on: PrefillKernels::small_m
  const int64_t small_m = ker.prefill ? ker.prefill->small_m : 0;
  const bool prefill_m =
      M >= kPrefillMinM || (small_m > 0 && (M >= kSmallMAnyW || (M >= small_m && N * K <= kSmallWBytes)));
  if (ker.prefill && (g.w_bits == 4 || ker.prefill->w8) && prefill_m && K > 0 &&
      16 * (g.w_bits == 4 ? K / 2 : K) < (int64_t(1) << 31)) {
    gemm_prefill(g, ker);
    return;
  }
  const int64_t kp = round_up(std::max<int64_t>(K, 1), kChunk);
  const int mr = ker.mr_max;
  const bool w4 = g.w_bits == 4;
  const int64_t w_stride = w4 ? K / 2 : K;  // bytes per W row
  // rows per M-block: as many as fit kPanelBytes, a multiple of mr, at least mr
  const int64_t mb_max = std::min<int64_t>(M, std::max<int64_t>(mr, kPanelBytes / kp / mr * mr));
  // Decode (one A row): wider W tiles, so each A load serves more W rows; W streams from memory once.
  const bool decode = mb_max == 1;
  const int nr = decode && w4 ? ker.nr_decode : ker.nr_max;

  std::vector<int8_t> panel((size_t)(mb_max * kp));
  std::vector<int32_t> rowsum((size_t)mb_max);
  std::vector<float> rscale((size_t)mb_max);
  const int64_t n_tiles = (N + nr - 1) / nr;
  const int64_t tile_grain = decode_tile_grain(nr, w_stride);
  // W tiles per L2 block (see the loop below)
  const int64_t tiles_per_block = std::max<int64_t>(1, kWBlockBytes / std::max<int64_t>(1, nr * w_stride));

  for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
    const int64_t mb = std::min(mb_max, M - m0);
    auto build_rows = [&](int64_t b, int64_t e) {
      std::vector<int8_t> tmp((size_t)K);
      for (int64_t r = b; r < e; ++r) {
        int8_t* dst = panel.data() + r * kp;
        rscale[r] = build_panel_row(g, ker, m0 + r, kp, dst, tmp.data(), w4);
        rowsum[r] = ker.row_sum(dst, kp);
      }
    };
    if (mb == 1) {
      build_rows(0, 1);   // decode: one row, no parallel region to open and join
    } else {
      parallel_for(0, mb, 1, build_rows);
    }
    parallel_for(0, n_tiles, tile_grain, [&](int64_t tb, int64_t te) {
      int32_t acc[16 * 16];
      // A block of this task's W tiles stays in L2 while every A tile (in L1) passes over it: W is read
      // from L2 in its packed 4-bit form (half a byte per k), the cheapest operand to stream.
      for (int64_t b0 = tb; b0 < te; b0 += tiles_per_block) {
        const int64_t b1 = std::min(te, b0 + tiles_per_block);
        for (int64_t i0 = 0; i0 < mb; i0 += mr) {
          const int mm = (int)std::min<int64_t>(mr, mb - i0);
          const int8_t* a = panel.data() + i0 * kp;
          for (int64_t t = b0; t < b1; ++t) {
            const int64_t n0 = t * nr;
            const int nn = (int)std::min<int64_t>(nr, N - n0);
            const void* w_tile = (const char*)g.w + n0 * w_stride;
            if (w4) {
              ker.tile_w4(a, kp, rowsum.data() + i0, g.a_bits, (const uint8_t*)w_tile, w_stride, K, mm, nn, acc);
            } else {
              ker.tile_w8(a, kp, (const int8_t*)w_tile, w_stride, K, mm, nn, acc);
            }
            store_tile(g, m0 + i0, n0, mm, nn, acc, rscale.data() + i0);
          }
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace pqk
