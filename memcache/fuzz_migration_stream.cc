// libFuzzer target for the migration stream parser. Besides "no crash", it
// checks the contract: every byte reported exactly once and in order, and
// every page record re-encodes to its raw bytes. The first input byte picks
// the chunking so incremental paths are exercised too.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kagemusha/memcache/migration_stream.h"

namespace {

using kagemusha::memcache::Fallback;
using kagemusha::memcache::PageRecord;

class RebuildingVisitor : public kagemusha::memcache::MigrationStreamVisitor {
 public:
  std::vector<uint8_t> out;
  bool fell_back = false;
  void OnPassthrough(std::span<const uint8_t> b) override {
    out.insert(out.end(), b.begin(), b.end());
  }
  void OnPage(const PageRecord& p) override {
    if (fell_back) abort();  // nothing is interpreted after a fallback
    std::vector<uint8_t> enc;
    if (!kagemusha::memcache::EncodePageRecord(p, enc)) abort();
    if (enc.size() != p.raw.size() || std::memcmp(enc.data(), p.raw.data(), enc.size()) != 0)
      abort();
    if (!p.zero && p.data.size() != kagemusha::memcache::kTargetPageSize) abort();
    out.insert(out.end(), enc.begin(), enc.end());
  }
  void OnFallback(const Fallback&) override {
    if (fell_back) abort();  // reported once
    fell_back = true;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t chunk = size_t(data[0] % 17) + 1;
  if (data[0] & 0x80) chunk = 4096 + data[0];
  std::span<const uint8_t> in(data + 1, size - 1);
  kagemusha::memcache::MigrationStreamParser parser;
  RebuildingVisitor v;
  for (size_t i = 0; i < in.size(); i += chunk)
    parser.Feed(in.subspan(i, std::min(chunk, in.size() - i)), v);
  (void)parser.Finish(v);
  if (v.out.size() != in.size() ||
      (in.size() && std::memcmp(v.out.data(), in.data(), in.size()) != 0))
    abort();
  return 0;
}
