// SHA-256 of whole 4096-byte pages, several pages at a time, with x86 vector
// and SHA instructions (private to kagemusha_memcache; PageHasher in
// page_store.h is the public face). Written from FIPS 180-4. Each kernel
// computes exactly SHA-256 (the same 32 bytes as OpenSSL) of independent
// pages; they differ only in how many pages go through together:
//
//   ShaNiX2          2 pages, the SHA-NI rounds of both interleaved
//   Avx2X8           8 pages in the 8 32-bit lanes of ymm registers
//   Avx512VlX8       8 pages in ymm, with AVX-512VL rotates and ternary logic
//   Avx512X16        16 pages in the 16 lanes of zmm registers
//   Avx512X16ShaNiX2 18 pages: 16 in zmm lanes and 2 through SHA-NI, in one loop
//
// Every kernel is compiled for its instruction set with a target attribute;
// call one only when the matching Cpu*() says the CPU has it. Inputs need no
// alignment; in[i] and out[i] may repeat (the same page in several lanes).
// Pure: no OpenSSL, no I/O, so the fuzz build (clang) compiles it as well.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kagemusha::memcache::sha256_pages {

inline constexpr size_t kPageBytes = 4096;
inline constexpr size_t kDigestBytes = 32;

void ShaNiX2(const uint8_t* const in[2], uint8_t* const out[2]);
void Avx2X8(const uint8_t* const in[8], uint8_t* const out[8]);
void Avx512VlX8(const uint8_t* const in[8], uint8_t* const out[8]);
void Avx512X16(const uint8_t* const in[16], uint8_t* const out[16]);
void Avx512X16ShaNiX2(const uint8_t* const in[18], uint8_t* const out[18]);

bool CpuHasShaNi();   // sha, sse4.1, ssse3
bool CpuHasAvx2();    // avx2
bool CpuHasAvx512();  // avx512f, avx512bw, avx512vl (zmm and the VL forms)

}  // namespace kagemusha::memcache::sha256_pages
