// libFuzzer target: arbitrary client bytes through the server side of the NBD
// protocol, the way a session consumes them: client flags, then options
// (header, payload or discard) through the HandshakeMachine, then, once in
// transmission, request headers through ParseRequestHeader/ValidateRequest
// (skipping write payloads), and the extent planners with extents derived
// from the input. Every server reply produced is re-parsed and checked for
// framing; an invariant break traps.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kagemusha/common/coding.h"
#include "nbd_server_codec.h"

using namespace kagemusha;
using namespace kagemusha::storage;
using namespace kagemusha::storage::nbd;

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

// Every option reply must be well framed.
void CheckOptionReplies(const std::vector<uint8_t>& out, bool export_name_reply) {
  if (export_name_reply) {
    Check(out.size() == 10 || out.size() == 134);
    return;
  }
  ByteReader r(out);
  while (!r.empty()) {
    auto magic = r.U64();
    r.U32();
    auto type = r.U32();
    auto len = r.U32();
    Check(len.has_value() && *magic == kOptReplyMagic);
    Check(r.Bytes(*len).has_value());
    if (*type == kRepInfo) Check(*len >= 2);
  }
}

std::vector<ExportDescriptor> Exports() {
  ExportDescriptor a;
  a.name = "";
  a.size = 1 << 20;
  a.can_flush = a.can_fua = a.can_trim = a.can_zero = a.can_fast_zero = a.can_cache = true;
  ExportDescriptor b = a;
  b.name = "disk";
  b.size = 3 * 4096 + 17;
  b.read_only = true;
  return {a, b};
}

void FuzzTransmission(ByteReader& in, const Negotiated& n) {
  for (int i = 0; i < 256 && in.remaining() >= kRequestHeaderSize; ++i) {
    auto hdr = ParseRequestHeader(*in.Bytes(kRequestHeaderSize));
    if (!hdr) return;  // the session disconnects here
    RequestCheck c = ValidateRequest(*hdr, n);
    if (c.disconnect) return;
    if (c.error == 0 && hdr->type != kCmdDisc && hdr->type != kCmdFlush) {
      // Accepted requests lie inside the export.
      Check(hdr->length > 0 && hdr->offset <= n.size && hdr->length <= n.size - hdr->offset);
      if (hdr->type == kCmdRead || hdr->type == kCmdWrite) Check(hdr->length <= kMaxPayload);
      if (n.tx_flags & kTxReadOnly) {
        Check(hdr->type != kCmdWrite && hdr->type != kCmdTrim && hdr->type != kCmdWriteZeroes);
      }
    }
    if (hdr->type == kCmdDisc && c.error == 0) return;
    if (c.payload_to_read) {
      if (in.remaining() < c.payload_to_read) return;
      in.Bytes(size_t(c.payload_to_read));
    }
  }
}

void FuzzExtents(ByteReader& in) {
  std::vector<Extent> ex;
  for (int i = 0; i < 64 && in.remaining() >= 5; ++i) {
    uint32_t len = *in.U32() % (1 << 20);
    uint8_t f = *in.U8();
    ex.push_back({len, (f & 1) != 0, (f & 2) != 0});
  }
  uint32_t length = uint32_t(1 + (ex.size() * 977) % (1 << 21));
  auto d = BlockStatusFromExtents(ex, length, ex.size() % 2 == 1);
  uint64_t total = 0;
  Check(!d.empty());
  for (const auto& x : d) {
    Check(x.length > 0);
    total += x.length;
  }
  Check(total <= length);
  std::vector<uint8_t> chunk;
  AppendBlockStatusChunk(chunk, 1, kBaseAllocationId, d);
  Check(chunk.size() == kStructuredReplyHeaderSize + 4 + 8 * d.size());

  const uint64_t offset = 12345;
  auto segs = PlanStructuredRead(ex, offset, length);
  uint64_t pos = offset;
  for (const auto& s : segs) {
    Check(s.offset == pos && s.length > 0);
    pos += s.length;
  }
  Check(pos == offset + length);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ByteReader in(std::span<const uint8_t>(data, size));
  HandshakeMachine m(Exports());
  auto flags = in.Bytes(4);
  if (!flags) return 0;
  if (m.OnClientFlags(*flags) != HandshakeStep::kContinue) return 0;
  std::vector<uint8_t> out;
  for (int i = 0; i < 64; ++i) {
    auto raw = in.Bytes(kOptionHeaderSize);
    if (!raw) return 0;
    auto h = ParseOptionHeader(*raw);
    if (!h) {
      // Reinterpret the bytes as extents input instead: keeps one target
      // covering the planners too.
      FuzzExtents(in);
      return 0;
    }
    out.clear();
    HandshakeStep step;
    switch (m.OnOptionHeader(*h)) {
      case HandshakeMachine::PayloadAction::kDisconnect:
        return 0;
      case HandshakeMachine::PayloadAction::kDiscard:
        Check(h->length > kMaxOptionLength);
        step = m.OnOversizedOption(*h, out);
        if (in.remaining() < h->length) return 0;
        in.Bytes(h->length);
        break;
      default: {
        auto payload = in.Bytes(h->length);
        if (!payload) return 0;
        step = m.OnOption(*h, *payload, out);
        break;
      }
    }
    if (step == HandshakeStep::kHardDisconnect) {
      Check(out.empty());
      return 0;
    }
    CheckOptionReplies(out, step == HandshakeStep::kTransmission && h->option == kOptExportName);
    if (step == HandshakeStep::kClose) return 0;
    if (step == HandshakeStep::kTransmission) {
      const Negotiated& n = m.negotiated();
      Check(n.export_index < 2);
      Check(!(n.tx_flags & kTxSendDf) || n.structured_replies);
      Check(!n.base_allocation || n.structured_replies);
      FuzzTransmission(in, n);
      return 0;
    }
  }
  return 0;
}
