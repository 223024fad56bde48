// libFuzzer target for the reuse-protocol codec (reuse_protocol.h). Besides
// "no crash, no over-read" (ASan/UBSan), it checks the contract: every frame
// the reader yields has a known type and a payload within the limit, and
// every payload that decodes re-encodes to the same bytes (so the decoders
// accept exactly what the encoders produce). The first input byte picks the
// chunking, so frames split across Append calls are exercised too.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kagemusha/memcache/reuse_protocol.h"

namespace {

using namespace kagemusha::memcache::reuse;
using Bytes = std::vector<uint8_t>;

void Check(bool ok) {
  if (!ok) abort();
}

void SameAsPayload(const Bytes& frame, std::span<const uint8_t> payload) {
  Check(frame.size() == kFrameHeaderBytes + payload.size());
  Check(std::memcmp(frame.data() + kFrameHeaderBytes, payload.data(), payload.size()) == 0);
}

void RoundTrip(const Frame& f) {
  Bytes out;
  switch (f.type) {
    case FrameType::kHello:
      if (auto h = DecodeHello(f.payload)) {
        Check(AppendHello(*h, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kSummary:
      if (auto s = DecodeSummary(f.payload)) {
        Check(AppendSummary(*s, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kPageRef:
      if (auto r = DecodePageRef(f.payload)) {
        // A CONTINUE header (flag bit 0) names no block: it continues the last one.
        Check(r->header.offset % kPageBytes == 0 &&
              (r->header.continued || !r->header.block.empty()));
        Check(AppendPageRef(*r, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kLiteral:
    case FrameType::kLiteralZstd: {
      bool z = f.type == FrameType::kLiteralZstd;
      if (auto l = DecodeLiteral(f.payload, z)) {
        if (!z) Check(l->data.size() == kPageBytes);
        Check(AppendLiteral(*l, z, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    }
    case FrameType::kZero:
      if (auto z = DecodeZero(f.payload)) {
        Check(AppendZero(*z, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kEnd:
      if (auto e = DecodeEnd(f.payload)) {
        Check(AppendEnd(*e, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kDone:
      if (auto d = DecodeDone(f.payload)) {
        Check(AppendDone(*d, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kAbort:
      if (auto a = DecodeAbort(f.payload)) {
        Check(AppendAbort(*a, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kDelivered:
      if (auto d = DecodeDelivered(f.payload)) {
        Check(AppendDelivered(*d, out).has_value());
        SameAsPayload(out, f.payload);
      }
      break;
    case FrameType::kPassthrough:
    case FrameType::kReturn:
      break;  // opaque bytes
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t chunk = size_t(data[0] % 16) + 1;
  if (data[0] >= 0xf0) chunk = size;  // whole
  std::span<const uint8_t> in(data + 1, size - 1);
  FrameReader r;
  for (size_t i = 0; i < in.size(); i += chunk) {
    r.Append(in.subspan(i, std::min(chunk, in.size() - i)));
    while (true) {
      auto f = r.Next();
      if (!f || !*f) break;
      Check(ParseFrameType(uint8_t((*f)->type)).has_value());
      Check((*f)->payload.size() <= kMaxFramePayload);
      RoundTrip(**f);
    }
  }
  return 0;
}
