// libFuzzer target for the bitmap file header codec (bitmap_format.h).
// Besides "never crash, never read out of bounds", it checks that:
//   - a header that decodes passes its own invariants (power-of-two block
//     size in range, block count consistent) and re-encodes to bytes that
//     decode to the same header, identical in the 44 meaningful bytes;
//   - CheckMatchesImage accepts a header for its own geometry.
// The first two input bytes steer a "repair" step (fix the magic, the
// version, the CRC) so the fuzzer gets past the early checks often.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "bitmap_format.h"
#include "kagemusha/common/coding.h"

using namespace kagemusha;
using namespace kagemusha::storage::bitmap;

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t steer = data[0];
  std::vector<uint8_t> in(data + 1, data + size);
  if ((steer & 1) && in.size() >= 8) std::copy(kMagic.begin(), kMagic.end(), in.begin());
  if ((steer & 2) && in.size() >= 12) StoreBe32(&in[8], kVersion);
  if ((steer & 4) && in.size() >= kHeaderFieldsSize)
    StoreBe32(&in[kCrcOffset], Crc32c(std::span<const uint8_t>(in.data(), kCrcOffset)));

  auto h = DecodeHeader(in);
  if (!h) {
    Check(!h.error().message().empty());
    return 0;
  }
  Check(h->version == kVersion && h->header_size == kHeaderSize && h->flags == 0);
  Check(h->block_size >= kMinBlockSize && h->block_size <= kMaxBlockSize);
  Check((h->block_size & (h->block_size - 1)) == 0);
  Check(h->block_count == BlockCount(h->image_size, h->block_size));
  auto again = EncodeHeader(*h);
  Check(std::equal(again.begin(), again.begin() + kHeaderFieldsSize, in.begin()));
  auto h2 = DecodeHeader(again);
  Check(h2.has_value() && *h2 == *h);
  Check(CheckMatchesImage(*h, h->image_size, h->block_size).has_value());
  return 0;
}
