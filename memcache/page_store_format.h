// On-disk format of the page store, version 1 (spec: docs/memcache.md).
// Private to kagemusha_memcache; the tests use it to damage files precisely.
//
// Segment file  segments/<id:08x>.seg
//   header  16 bytes: "KGMPSEG1" | be32 version (1) | be32 crc32c(bytes 0..11)
//   records, each kRecordSize bytes, back to back:
//     be32 magic "KPR1" | be32 crc32c(digest || page) | digest[32] | page[4096]
// Manifest file  manifests/<vm>.kmf
//   "KGMMANI1" | be32 version (1) | be32 reserved (0) | be64 entry count |
//   entries: u8 idstr length | idstr | be64 offset | digest[32] |
//   be32 crc32c(all preceding bytes)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kagemusha/memcache/page_store.h"

namespace kagemusha::memcache::store_format {

inline constexpr uint32_t kVersion = 1;
inline constexpr std::string_view kSegmentMagic = "KGMPSEG1";
inline constexpr size_t kSegmentHeaderSize = 16;
inline constexpr uint32_t kRecordMagic = 0x4b505231;  // "KPR1"
inline constexpr size_t kRecordHeaderSize = 8 + 32;
inline constexpr size_t kRecordSize = kRecordHeaderSize + kStorePageSize;
inline constexpr std::string_view kManifestMagic = "KGMMANI1";
inline constexpr size_t kManifestHeaderSize = 8 + 4 + 4 + 8;
inline constexpr std::string_view kSegmentSuffix = ".seg";
inline constexpr std::string_view kManifestSuffix = ".kmf";

}  // namespace kagemusha::memcache::store_format
