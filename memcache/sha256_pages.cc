// Multi-page SHA-256 kernels (sha256_pages.h). Written from FIPS 180-4 and
// the Intel intrinsics reference; see docs/memcache.md, "Digest choice", for
// the measured rate of each kernel.
#include "sha256_pages.h"

// GCC 12 reports its own _mm512_undefined_epi32() (the "don't care" operand
// of unmasked AVX-512 intrinsics) as used uninitialized (GCC bug 105593);
// the warning is located in the header, so it is silenced before including it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>

#include <cstring>

namespace kagemusha::memcache::sha256_pages {
namespace {

constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
constexpr uint32_t kIv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

// A 4096-byte message is 64 data blocks and one padding block: 0x80, zeros,
// and the message length in bits (32768) as a big-endian 64-bit number.
struct PaddingBlock {
  uint8_t bytes[64] = {};
  uint32_t words[16] = {};
  constexpr PaddingBlock() {
    bytes[0] = 0x80;
    const uint64_t bits = uint64_t{kPageBytes} * 8;
    for (int i = 0; i < 8; ++i) bytes[63 - i] = uint8_t(bits >> (8 * i));
    for (int i = 0; i < 16; ++i)
      words[i] = uint32_t(bytes[4 * i]) << 24 | uint32_t(bytes[4 * i + 1]) << 16 |
                 uint32_t(bytes[4 * i + 2]) << 8 | bytes[4 * i + 3];
  }
};
constexpr PaddingBlock kPadding;

constexpr uint32_t Rotr(uint32_t x, int n) { return x >> n | x << (32 - n); }

// W[t] + K[t] of the padding block, the same for every page.
struct PaddingSchedule {
  uint32_t wk[64] = {};
  constexpr PaddingSchedule() {
    uint32_t w[64] = {};
    for (int t = 0; t < 16; ++t) w[t] = kPadding.words[t];
    for (int t = 16; t < 64; ++t) {
      const uint32_t s0 = Rotr(w[t - 15], 7) ^ Rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const uint32_t s1 = Rotr(w[t - 2], 17) ^ Rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    for (int t = 0; t < 64; ++t) wk[t] = w[t] + kK[t];
  }
};
constexpr PaddingSchedule kPaddingSchedule;
constexpr const uint32_t* kPadWK = kPaddingSchedule.wk;

inline void StoreBigEndian32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}

// ------------------------------------------------------------- SHA-NI --
// The state is kept as the SHA-NI instructions want it (ABEF, CDGH). The
// helpers are always_inline so the combined AVX-512 kernel can interleave a
// SHA-NI page's rounds with its own.

#define KM_SHANI_TARGET __attribute__((target("sha,sse4.1,ssse3")))
#define KM_SHANI_INLINE KM_SHANI_TARGET __attribute__((always_inline)) inline

struct ShaNiLane {
  __m128i abef, cdgh, saved_abef, saved_cdgh;
  __m128i w[4];  // the last 16 message words, four per register
};

// pshufb mask reversing the bytes of each 32-bit word (plain SSE2 to build,
// so every kernel can inline it).
__attribute__((always_inline)) inline __m128i ByteSwapMask() {
  return _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
}

KM_SHANI_INLINE void ShaNiInit(ShaNiLane& l) {
  const __m128i dcba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIv));
  const __m128i hgfe = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIv + 4));
  const __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
  const __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
  l.abef = _mm_alignr_epi8(cdab, efgh, 8);
  l.cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
}

KM_SHANI_INLINE void ShaNiBeginBlock(ShaNiLane& l, const uint8_t* block) {
  const __m128i bswap = ByteSwapMask();
#pragma GCC unroll 16
  for (int g = 0; g < 4; ++g)
    l.w[g] =
        _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * g)), bswap);
  l.saved_abef = l.abef;
  l.saved_cdgh = l.cdgh;
}

// Rounds 4g..4g+3 (g constant after unrolling).
KM_SHANI_INLINE void ShaNiQuad(ShaNiLane& l, int g) {
  __m128i& wg = l.w[g & 3];
  if (g >= 4) {
    // W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four at a time.
    __m128i t = _mm_sha256msg1_epu32(wg, l.w[(g + 1) & 3]);
    t = _mm_add_epi32(t, _mm_alignr_epi8(l.w[(g + 3) & 3], l.w[(g + 2) & 3], 4));
    wg = _mm_sha256msg2_epu32(t, l.w[(g + 3) & 3]);
  }
  const __m128i msg =
      _mm_add_epi32(wg, _mm_loadu_si128(reinterpret_cast<const __m128i*>(kK + 4 * g)));
  l.cdgh = _mm_sha256rnds2_epu32(l.cdgh, l.abef, msg);
  l.abef = _mm_sha256rnds2_epu32(l.abef, l.cdgh, _mm_shuffle_epi32(msg, 0x0E));
}

KM_SHANI_INLINE void ShaNiEndBlock(ShaNiLane& l) {
  l.abef = _mm_add_epi32(l.abef, l.saved_abef);
  l.cdgh = _mm_add_epi32(l.cdgh, l.saved_cdgh);
}

KM_SHANI_INLINE void ShaNiStore(const ShaNiLane& l, uint8_t* out) {
  const __m128i bswap = ByteSwapMask();
  const __m128i feba = _mm_shuffle_epi32(l.abef, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(l.cdgh, 0xB1);
  const __m128i dcba = _mm_blend_epi16(feba, dchg, 0xF0);
  const __m128i hgfe = _mm_alignr_epi8(dchg, feba, 8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(dcba, bswap));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_shuffle_epi8(hgfe, bswap));
}

// ---------------------------------------------------------------- AVX2 --
namespace avx2 {
#define KM_TARGET __attribute__((target("avx2")))
#define KM_INLINE KM_TARGET __attribute__((always_inline)) inline
using V = __m256i;
constexpr int kLanes = 8;

KM_INLINE V Add(V a, V b) { return _mm256_add_epi32(a, b); }
KM_INLINE V Set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
template <int N>
KM_INLINE V Ror(V x) {
  return _mm256_or_si256(_mm256_srli_epi32(x, N), _mm256_slli_epi32(x, 32 - N));
}
KM_INLINE V Xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
KM_INLINE V BigSigma0(V x) { return Xor3(Ror<2>(x), Ror<13>(x), Ror<22>(x)); }
KM_INLINE V BigSigma1(V x) { return Xor3(Ror<6>(x), Ror<11>(x), Ror<25>(x)); }
KM_INLINE V SmallSigma0(V x) { return Xor3(Ror<7>(x), Ror<18>(x), _mm256_srli_epi32(x, 3)); }
KM_INLINE V SmallSigma1(V x) { return Xor3(Ror<17>(x), Ror<19>(x), _mm256_srli_epi32(x, 10)); }
// Ch = (e & f) ^ (~e & g) = ((f ^ g) & e) ^ g.
KM_INLINE V Ch(V e, V f, V g) {
  return _mm256_xor_si256(_mm256_and_si256(_mm256_xor_si256(f, g), e), g);
}
// Maj = ((a ^ b) & (b ^ c)) ^ b; a ^ b is the next round's b ^ c, which the
// compiler reuses once the rounds are unrolled.
KM_INLINE V Maj(V a, V b, V c) {
  return _mm256_xor_si256(_mm256_and_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(b, c)), b);
}

// 8x8 transpose of 32-bit words, twice (words 0-7 and 8-15 of the block).
KM_INLINE void LoadBlock(const uint8_t* const in[kLanes], size_t off, V w[16]) {
  const V bswap = _mm256_broadcastsi128_si256(ByteSwapMask());
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    V r[8], t[8], u[8];
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_shuffle_epi8(
          _mm256_loadu_si256(reinterpret_cast<const V*>(in[i] + off + 32 * half)), bswap);
#pragma GCC unroll 16
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    // u[4g + j], 128-bit lane L: word 8*half + 4L + j of pages 4g..4g+3.
#pragma GCC unroll 16
    for (int g = 0; g < 2; ++g) {
      u[4 * g + 0] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
      u[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
      u[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
      u[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) {
      w[8 * half + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
      w[8 * half + 4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
  }
}

#include "sha256_lanes.inc"
#undef KM_TARGET
#undef KM_INLINE
}  // namespace avx2

// ------------------------------------------- AVX-512VL, 8 lanes in ymm --
namespace avx512vl {
#define KM_TARGET __attribute__((target("avx2,avx512f,avx512vl")))
#define KM_INLINE KM_TARGET __attribute__((always_inline)) inline
using V = __m256i;
constexpr int kLanes = 8;

KM_INLINE V Add(V a, V b) { return _mm256_add_epi32(a, b); }
KM_INLINE V Set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
// Ternary-logic truth tables, operands (a, b, c) -> bit 4a + 2b + c:
// 0x96 a ^ b ^ c, 0xCA a ? b : c (Ch), 0xE8 majority.
KM_INLINE V BigSigma0(V x) {
  return _mm256_ternarylogic_epi32(_mm256_ror_epi32(x, 2), _mm256_ror_epi32(x, 13),
                                   _mm256_ror_epi32(x, 22), 0x96);
}
KM_INLINE V BigSigma1(V x) {
  return _mm256_ternarylogic_epi32(_mm256_ror_epi32(x, 6), _mm256_ror_epi32(x, 11),
                                   _mm256_ror_epi32(x, 25), 0x96);
}
KM_INLINE V SmallSigma0(V x) {
  return _mm256_ternarylogic_epi32(_mm256_ror_epi32(x, 7), _mm256_ror_epi32(x, 18),
                                   _mm256_srli_epi32(x, 3), 0x96);
}
KM_INLINE V SmallSigma1(V x) {
  return _mm256_ternarylogic_epi32(_mm256_ror_epi32(x, 17), _mm256_ror_epi32(x, 19),
                                   _mm256_srli_epi32(x, 10), 0x96);
}
KM_INLINE V Ch(V e, V f, V g) { return _mm256_ternarylogic_epi32(e, f, g, 0xCA); }
KM_INLINE V Maj(V a, V b, V c) { return _mm256_ternarylogic_epi32(a, b, c, 0xE8); }

KM_INLINE void LoadBlock(const uint8_t* const in[kLanes], size_t off, V w[16]) {
  avx2::LoadBlock(in, off, w);
}

#include "sha256_lanes.inc"
#undef KM_TARGET
#undef KM_INLINE
}  // namespace avx512vl

// ------------------------------------------------ AVX-512, 16 lanes in zmm --
namespace avx512 {
#define KM_TARGET __attribute__((target("avx2,avx512f,avx512bw,avx512vl")))
#define KM_INLINE KM_TARGET __attribute__((always_inline)) inline
using V = __m512i;
constexpr int kLanes = 16;

KM_INLINE V Add(V a, V b) { return _mm512_add_epi32(a, b); }
KM_INLINE V Set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
KM_INLINE V BigSigma0(V x) {
  return _mm512_ternarylogic_epi32(_mm512_ror_epi32(x, 2), _mm512_ror_epi32(x, 13),
                                   _mm512_ror_epi32(x, 22), 0x96);
}
KM_INLINE V BigSigma1(V x) {
  return _mm512_ternarylogic_epi32(_mm512_ror_epi32(x, 6), _mm512_ror_epi32(x, 11),
                                   _mm512_ror_epi32(x, 25), 0x96);
}
KM_INLINE V SmallSigma0(V x) {
  return _mm512_ternarylogic_epi32(_mm512_ror_epi32(x, 7), _mm512_ror_epi32(x, 18),
                                   _mm512_srli_epi32(x, 3), 0x96);
}
KM_INLINE V SmallSigma1(V x) {
  return _mm512_ternarylogic_epi32(_mm512_ror_epi32(x, 17), _mm512_ror_epi32(x, 19),
                                   _mm512_srli_epi32(x, 10), 0x96);
}
KM_INLINE V Ch(V e, V f, V g) { return _mm512_ternarylogic_epi32(e, f, g, 0xCA); }
KM_INLINE V Maj(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0xE8); }

// 16x16 transpose of 32-bit words: pairs of rows (epi32), quads (epi64),
// then the 128-bit blocks of four quads (two rounds of shuffle_i32x4).
KM_INLINE void LoadBlock(const uint8_t* const in[kLanes], size_t off, V w[16]) {
  const V bswap = _mm512_broadcast_i32x4(ByteSwapMask());
  V r[16], t[16], u[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(in[i] + off), bswap);
#pragma GCC unroll 16
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  // u[4g + j], 128-bit lane L: word 4L + j of pages 4g..4g+3.
#pragma GCC unroll 16
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // w[4L + j] = lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
#pragma GCC unroll 16
  for (int j = 0; j < 4; ++j) {
    const V x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);       // A0 A1 B0 B1
    const V x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);       // A2 A3 B2 B3
    const V x2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);  // C0 C1 D0 D1
    const V x3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);  // C2 C3 D2 D3
    w[j] = _mm512_shuffle_i32x4(x0, x2, 0x88);                     // A0 B0 C0 D0
    w[4 + j] = _mm512_shuffle_i32x4(x0, x2, 0xDD);                 // A1 B1 C1 D1
    w[8 + j] = _mm512_shuffle_i32x4(x1, x3, 0x88);                 // A2 B2 C2 D2
    w[12 + j] = _mm512_shuffle_i32x4(x1, x3, 0xDD);                // A3 B3 C3 D3
  }
}

#include "sha256_lanes.inc"

// 16 pages in zmm lanes and two more through SHA-NI in the same loop: the
// SHA-NI rounds run on their own unit while the vector ALUs do the lanes.
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,sha,sse4.1,ssse3"))) void HashPagesWithShaNi(
    const uint8_t* const in[kLanes + 2], uint8_t* const out[kLanes + 2]) {
  V s[8];
  InitState(s);
  ShaNiLane ni[2];
  ShaNiInit(ni[0]);
  ShaNiInit(ni[1]);
  for (size_t off = 0; off <= kPageBytes; off += 64) {
    const bool data = off < kPageBytes;
    V w[64], saved[8];
    if (data) {
      LoadBlock(in, off, w);
      Expand(w);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i) saved[i] = s[i];
    for (int p = 0; p < 2; ++p)
      ShaNiBeginBlock(ni[p], data ? in[kLanes + p] + off : kPadding.bytes);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      if (data)
        DataRounds8(s, w, r);
      else
        PaddingRounds8(s, r);
#pragma GCC unroll 16
      for (int p = 0; p < 2; ++p) {
        ShaNiQuad(ni[p], 2 * r);
        ShaNiQuad(ni[p], 2 * r + 1);
      }
    }
    AddState(s, saved);
#pragma GCC unroll 16
    for (int p = 0; p < 2; ++p) ShaNiEndBlock(ni[p]);
  }
  StoreDigests(s, out);
#pragma GCC unroll 16
  for (int p = 0; p < 2; ++p) ShaNiStore(ni[p], out[kLanes + p]);
}

#undef KM_TARGET
#undef KM_INLINE
}  // namespace avx512

KM_SHANI_TARGET void ShaNiPages2(const uint8_t* const in[2], uint8_t* const out[2]) {
  ShaNiLane l[2];
  ShaNiInit(l[0]);
  ShaNiInit(l[1]);
  for (size_t off = 0; off <= kPageBytes; off += 64) {
#pragma GCC unroll 16
    for (int p = 0; p < 2; ++p)
      ShaNiBeginBlock(l[p], off < kPageBytes ? in[p] + off : kPadding.bytes);
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g)
#pragma GCC unroll 16
      for (int p = 0; p < 2; ++p) ShaNiQuad(l[p], g);
#pragma GCC unroll 16
    for (int p = 0; p < 2; ++p) ShaNiEndBlock(l[p]);
  }
#pragma GCC unroll 16
  for (int p = 0; p < 2; ++p) ShaNiStore(l[p], out[p]);
}

}  // namespace

void ShaNiX2(const uint8_t* const in[2], uint8_t* const out[2]) { ShaNiPages2(in, out); }
void Avx2X8(const uint8_t* const in[8], uint8_t* const out[8]) { avx2::HashPages(in, out); }
void Avx512VlX8(const uint8_t* const in[8], uint8_t* const out[8]) { avx512vl::HashPages(in, out); }
void Avx512X16(const uint8_t* const in[16], uint8_t* const out[16]) { avx512::HashPages(in, out); }
void Avx512X16ShaNiX2(const uint8_t* const in[18], uint8_t* const out[18]) {
  avx512::HashPagesWithShaNi(in, out);
}

namespace {

// CPUID and XGETBV directly (Intel SDM vol. 2, CPUID leaves 1 and 7): clang
// 14's __builtin_cpu_supports knows no "sha". The vector kernels also need
// the OS to save the ymm/zmm state (XCR0), not only the CPU to have them.
struct CpuFeatures {
  bool sha_ni = false, avx2 = false, avx512 = false;
};

CpuFeatures DetectCpu() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool ssse3 = c & (1u << 9), sse41 = c & (1u << 19), osxsave = c & (1u << 27),
             avx = c & (1u << 28);
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), sha = b & (1u << 29),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  uint64_t xcr0 = 0;
  if (osxsave) {
    uint32_t lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = uint64_t{hi} << 32 | lo;
  }
  const bool os_ymm = (xcr0 & 0x6) == 0x6;    // SSE and AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;  // and opmask, ZMM_Hi256, Hi16_ZMM
  f.sha_ni = sha && sse41 && ssse3;
  f.avx2 = avx && avx2 && os_ymm;
  f.avx512 = f.avx2 && avx512f && avx512bw && avx512vl && os_zmm;
  return f;
}

const CpuFeatures& Cpu() {
  static const CpuFeatures f = DetectCpu();
  return f;
}

}  // namespace

bool CpuHasShaNi() { return Cpu().sha_ni; }
bool CpuHasAvx2() { return Cpu().avx2; }
bool CpuHasAvx512() { return Cpu().avx512; }

}  // namespace kagemusha::memcache::sha256_pages
