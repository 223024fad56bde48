// libFuzzer target for the client direction of the NBD codec: everything a
// (possibly hostile) server can send us, fed through the parsers in the
// order a real handshake and transmission would meet them, plus the URI
// parser. Input layout: byte 0 picks the entry point, the rest is the
// server's byte stream.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "kagemusha/storage/nbd_client.h"
#include "nbd_client_codec.h"

namespace nbd = kagemusha::storage::nbd;

namespace {

// Greeting, then option replies to NBD_OPT_GO until the negotiation ends.
void FuzzHandshake(std::span<const uint8_t> in) {
  if (in.size() < nbd::kServerGreetingSize) return;
  auto greeting = nbd::ParseServerGreeting(in.first(nbd::kServerGreetingSize));
  in = in.subspan(nbd::kServerGreetingSize);
  bool no_zeroes = greeting ? greeting->no_zeroes() : false;
  nbd::GoNegotiation go(nbd::kOptGo, "disk", "nbd://fuzz:10809/disk");
  while (in.size() >= nbd::kOptionReplyHeaderSize) {
    auto header = nbd::ParseOptionReplyHeader(in.first(nbd::kOptionReplyHeaderSize));
    in = in.subspan(nbd::kOptionReplyHeaderSize);
    if (!header) return;
    size_t n = std::min<size_t>(header->length, in.size());
    auto step = go.Feed(*header, in.first(n));  // length mismatch is itself a case
    in = in.subspan(n);
    if (!step) return;
    if (*step == nbd::GoNegotiation::Step::kDone) break;
    if (*step == nbd::GoNegotiation::Step::kUnsupported) {
      size_t want = nbd::ExportNameReplySize(no_zeroes);
      if (in.size() >= want) (void)nbd::ParseExportNameReply(in.first(want), no_zeroes);
      return;
    }
  }
}

// Transmission: a stream of simple replies and structured chunk headers.
void FuzzReplies(std::span<const uint8_t> in) {
  while (in.size() >= 4) {
    auto kind = nbd::ClassifyReplyMagic(in.first<4>());
    if (kind == nbd::ReplyKind::kSimple && in.size() >= nbd::kSimpleReplySize) {
      auto r = nbd::ParseSimpleReply(in.first(nbd::kSimpleReplySize));
      if (r) (void)nbd::NbdErrorToErrno(r->error);
      // The payload length is known only from the request; pretend 512.
      in = in.subspan(std::min<size_t>(in.size(), nbd::kSimpleReplySize + 512));
    } else if (kind == nbd::ReplyKind::kStructured &&
               in.size() >= nbd::kStructuredReplyHeaderSize) {
      auto h = nbd::ParseStructuredReplyHeader(in.first(nbd::kStructuredReplyHeaderSize));
      in = in.subspan(nbd::kStructuredReplyHeaderSize);
      if (!h) return;
      in = in.subspan(std::min<size_t>(in.size(), h->length));
    } else {
      return;
    }
  }
}

void FuzzInfo(std::span<const uint8_t> in) {
  auto info = nbd::ParseInfoReply(in);
  if (info && info->block_size) {
    uint32_t limit = nbd::EffectiveMaxRequest(4 << 20, info->block_size);
    auto pieces = nbd::SplitRead(in.size(), 1 << 20, limit, info->block_size->minimum);
    uint64_t total = 0;
    for (const auto& p : pieces) {
      if (p.length == 0 || p.length > limit) __builtin_trap();
      total += p.length;
    }
    if (total != (1 << 20)) __builtin_trap();
  }
}

void FuzzUri(std::span<const uint8_t> in) {
  std::string s(in.begin(), in.end());
  auto uri = kagemusha::storage::ParseNbdUri(s);
  if (!uri) return;
  // Printing then parsing again must give the same endpoint and export.
  auto again = kagemusha::storage::ParseNbdUri(uri->ToString());
  if (!again || again->export_name != uri->export_name || again->host != uri->host ||
      again->port != uri->port || again->socket_path != uri->socket_path) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::span<const uint8_t> in(data + 1, size - 1);
  switch (data[0] % 4) {
    case 0:
      FuzzHandshake(in);
      break;
    case 1:
      FuzzReplies(in);
      break;
    case 2:
      FuzzInfo(in);
      break;
    case 3:
      FuzzUri(in);
      break;
  }
  return 0;
}
