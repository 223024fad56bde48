// Mobility Header codec. See mobility_header.h. Pure: no I/O.
#include <algorithm>
#include <string>

#include "kagemusha/common/coding.h"
#include "kagemusha/tunnel/mobility_header.h"

namespace kagemusha::tunnel {
namespace {

constexpr size_t kMaxMobilityHeader = 8 * 256;  // Header Len is one octet of 8-octet units

Error Bad(const std::string& what) { return Error::Protocol(what); }

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;  // clang 14 (fuzz build) lacks aggregate CTAD

// Offset of the first option (= length of the fixed part) for each message type
// this codec understands, or 0 for others.
size_t FixedLength(uint8_t type) {
  switch (type) {
    case mh_type::kBindingRefreshRequest:
      return 8;
    case mh_type::kBindingUpdate:
    case mh_type::kBindingAcknowledgement:
      return 12;
    case mh_type::kBindingError:
      return 24;
    default:
      return 0;
  }
}

// Appends Pad1/PadN so the next byte lands at x*n + y (RFC 6275 §6.2.1).
void PadTo(std::vector<uint8_t>& out, size_t x, size_t y) {
  if (x == 0) return;
  size_t pad = (y + x - out.size() % x) % x;
  if (pad == 1) {
    out.push_back(mh_option::kPad1);
  } else if (pad >= 2) {
    out.push_back(mh_option::kPadN);
    out.push_back(uint8_t(pad - 2));
    out.insert(out.end(), pad - 2, 0);
  }
}

// Appends one option with the padding its alignment needs; returns the error,
// if any (an optional<Error> keeps the std::visit lambdas' return type simple).
std::optional<Error> EncodeOption(const MobilityOption& option, std::vector<uint8_t>& out) {
  ByteWriter w(out);
  auto body_too_long = [](size_t n) { return n > 255; };
  return std::visit(
      Overloaded{
          [&](const BindingRefreshAdvice& o) -> std::optional<Error> {
            PadTo(out, 2, 0);
            w.U8(mh_option::kBindingRefreshAdvice);
            w.U8(2);
            w.U16(o.refresh_interval);
            return std::nullopt;
          },
          [&](const AlternateCareOfAddress& o) -> std::optional<Error> {
            PadTo(out, 8, 6);
            w.U8(mh_option::kAlternateCareOfAddress);
            w.U8(16);
            w.Bytes(o.address);
            return std::nullopt;
          },
          [&](const NonceIndices& o) -> std::optional<Error> {
            PadTo(out, 2, 0);
            w.U8(mh_option::kNonceIndices);
            w.U8(4);
            w.U16(o.home_nonce_index);
            w.U16(o.care_of_nonce_index);
            return std::nullopt;
          },
          [&](const BindingAuthorizationData& o) -> std::optional<Error> {
            if (body_too_long(o.authenticator.size()))
              return Error::Invalid("Binding Authorization Data longer than 255 bytes");
            PadTo(out, 8, 2);
            w.U8(mh_option::kBindingAuthorizationData);
            w.U8(uint8_t(o.authenticator.size()));
            w.Bytes(o.authenticator);
            return std::nullopt;
          },
          [&](const Ipv4HomeAddress& o) -> std::optional<Error> {
            if (o.prefix_length > 32)
              return Error::Invalid("IPv4 home address prefix length above 32");
            PadTo(out, 4, 0);
            w.U8(mh_option::kIpv4HomeAddress);
            w.U8(6);
            w.U16(uint16_t(o.prefix_length << 10 | (o.mobile_network_prefix ? 0x0200 : 0)));
            w.Bytes(o.address);
            return std::nullopt;
          },
          [&](const Ipv4AddressAcknowledgement& o) -> std::optional<Error> {
            if (o.prefix_length > 32)
              return Error::Invalid("IPv4 acknowledgement prefix length above 32");
            PadTo(out, 4, 0);
            w.U8(mh_option::kIpv4AddressAcknowledgement);
            w.U8(6);
            w.U8(o.status);
            w.U8(uint8_t(o.prefix_length << 2));
            w.Bytes(o.address);
            return std::nullopt;
          },
          [&](const Ipv4CareOfAddress& o) -> std::optional<Error> {
            PadTo(out, 4, 0);
            w.U8(mh_option::kIpv4CareOfAddress);
            w.U8(6);
            w.U16(0);
            w.Bytes(o.address);
            return std::nullopt;
          },
          [&](const MobilityMessageAuthentication& o) -> std::optional<Error> {
            if (body_too_long(5 + o.authenticator.size()))
              return Error::Invalid("Mobility Message Authentication data too long");
            PadTo(out, 4, 1);
            w.U8(mh_option::kMobilityMessageAuthentication);
            w.U8(uint8_t(5 + o.authenticator.size()));
            w.U8(o.subtype);
            w.U32(o.spi);
            w.Bytes(o.authenticator);
            return std::nullopt;
          },
          [&](const UnknownMobilityOption& o) -> std::optional<Error> {
            if (o.type == mh_option::kPad1 || o.type == mh_option::kPadN)
              return Error::Invalid("padding is inserted by the encoder, not given as an option");
            if (body_too_long(o.data.size()))
              return Error::Invalid("mobility option longer than 255 bytes");
            w.U8(o.type);
            w.U8(uint8_t(o.data.size()));
            w.Bytes(o.data);
            return std::nullopt;
          },
      },
      option);
}

Status EncodeOptions(const MobilityOptions& options, std::vector<uint8_t>& out) {
  for (size_t i = 0; i < options.size(); ++i) {
    if (std::holds_alternative<MobilityMessageAuthentication>(options[i]) &&
        i + 1 != options.size())
      return Fail(Error::Invalid(
          "Mobility Message Authentication option must be the last option (RFC 4285)"));
    if (auto e = EncodeOption(options[i], out)) return Fail(*e);
  }
  return Ok();
}

std::optional<Error> Collect(const Status& s) {
  if (s) return std::nullopt;
  return s.error();
}

std::string OptName(uint8_t type) { return "mobility option " + std::to_string(type); }

// Decodes the options region [begin, end) of `mh`.
Result<MobilityOptions> DecodeOptions(std::span<const uint8_t> region) {
  MobilityOptions options;
  ByteReader r(region);
  bool seen_auth = false;
  while (!r.empty()) {
    uint8_t type = *r.U8();
    if (type == mh_option::kPad1) continue;
    auto len = r.U8();
    if (!len) return Fail(Bad(OptName(type) + " truncated before its length"));
    auto body = r.Bytes(*len);
    if (!body)
      return Fail(Bad(OptName(type) + " length " + std::to_string(*len) +
                      " overruns the Mobility Header by " + std::to_string(*len - r.remaining()) +
                      " bytes"));
    if (type == mh_option::kPadN) continue;
    if (seen_auth)
      return Fail(Bad("option after the Mobility Message Authentication option (RFC 4285)"));
    auto want = [&](size_t n) -> Status {
      if (*len != n)
        return Fail(Bad(OptName(type) + " length " + std::to_string(*len) + ", expected " +
                        std::to_string(n)));
      return Ok();
    };
    const uint8_t* b = body->data();
    switch (type) {
      case mh_option::kBindingRefreshAdvice:
        if (auto s = want(2); !s) return Fail(s.error());
        options.push_back(BindingRefreshAdvice{LoadBe16(b)});
        break;
      case mh_option::kAlternateCareOfAddress: {
        if (auto s = want(16); !s) return Fail(s.error());
        AlternateCareOfAddress o;
        std::copy(b, b + 16, o.address.begin());
        options.push_back(o);
        break;
      }
      case mh_option::kNonceIndices:
        if (auto s = want(4); !s) return Fail(s.error());
        options.push_back(NonceIndices{LoadBe16(b), LoadBe16(b + 2)});
        break;
      case mh_option::kBindingAuthorizationData:
        options.push_back(BindingAuthorizationData{{body->begin(), body->end()}});
        break;
      case mh_option::kIpv4HomeAddress: {
        if (auto s = want(6); !s) return Fail(s.error());
        Ipv4HomeAddress o;
        o.prefix_length = b[0] >> 2;
        o.mobile_network_prefix = b[0] & 0x02;
        std::copy(b + 2, b + 6, o.address.begin());
        if (o.prefix_length > 32) return Fail(Bad("IPv4 Home Address prefix length above 32"));
        options.push_back(o);
        break;
      }
      case mh_option::kIpv4AddressAcknowledgement: {
        if (auto s = want(6); !s) return Fail(s.error());
        Ipv4AddressAcknowledgement o;
        o.status = b[0];
        o.prefix_length = b[1] >> 2;
        std::copy(b + 2, b + 6, o.address.begin());
        if (o.prefix_length > 32)
          return Fail(Bad("IPv4 Address Acknowledgement prefix length above 32"));
        options.push_back(o);
        break;
      }
      case mh_option::kIpv4CareOfAddress: {
        if (auto s = want(6); !s) return Fail(s.error());
        Ipv4CareOfAddress o;
        std::copy(b + 2, b + 6, o.address.begin());
        options.push_back(o);
        break;
      }
      case mh_option::kMobilityMessageAuthentication: {
        if (*len < 5) return Fail(Bad("Mobility Message Authentication option shorter than 5"));
        MobilityMessageAuthentication o;
        o.subtype = b[0];
        o.spi = LoadBe32(b + 1);
        o.authenticator.assign(b + 5, b + *len);
        options.push_back(std::move(o));
        seen_auth = true;
        break;
      }
      default:
        // RFC 6275 §6.2.1: options a receiver does not understand are skipped
        // using their length; we keep them so the caller can see them.
        options.push_back(UnknownMobilityOption{type, {body->begin(), body->end()}});
        break;
    }
  }
  return options;
}

}  // namespace

Result<std::vector<uint8_t>> EncodeMobilityHeader(const MobilityMessage& message,
                                                  std::optional<ChecksumAddresses> addresses) {
  std::vector<uint8_t> out;
  out.reserve(64);
  ByteWriter w(out);
  w.U8(ipproto::kNoNextHeader);
  w.U8(0);  // Header Len, patched below
  uint8_t type = std::visit(
      Overloaded{[](const BindingRefreshRequest&) { return mh_type::kBindingRefreshRequest; },
                 [](const BindingUpdate&) { return mh_type::kBindingUpdate; },
                 [](const BindingAcknowledgement&) { return mh_type::kBindingAcknowledgement; },
                 [](const BindingError&) { return mh_type::kBindingError; },
                 [](const UnrecognizedMobilityMessage& m) { return m.mh_type; }},
      message);
  w.U8(type);
  w.U8(0);   // Reserved
  w.U16(0);  // Checksum, patched below
  std::optional<Error> err =
      std::visit(Overloaded{
                     [&](const BindingRefreshRequest& m) -> std::optional<Error> {
                       w.U16(0);
                       return Collect(EncodeOptions(m.options, out));
                     },
                     [&](const BindingUpdate& m) -> std::optional<Error> {
                       w.U16(m.sequence);
                       w.U16(m.flags);
                       w.U16(m.lifetime);
                       return Collect(EncodeOptions(m.options, out));
                     },
                     [&](const BindingAcknowledgement& m) -> std::optional<Error> {
                       w.U8(m.status);
                       w.U8(m.flags);
                       w.U16(m.sequence);
                       w.U16(m.lifetime);
                       return Collect(EncodeOptions(m.options, out));
                     },
                     [&](const BindingError& m) -> std::optional<Error> {
                       w.U8(m.status);
                       w.U8(0);
                       w.Bytes(m.home_address);
                       return Collect(EncodeOptions(m.options, out));
                     },
                     [&](const UnrecognizedMobilityMessage& m) -> std::optional<Error> {
                       if (FixedLength(m.mh_type) != 0)
                         return Error::Invalid("MH type " + std::to_string(m.mh_type) +
                                               " has its own message struct");
                       if ((m.data.size() + 6) % 8 != 0)
                         return Error::Invalid("unrecognised MH message data must be 8n+2 bytes");
                       w.Bytes(m.data);
                       return std::nullopt;
                     },
                 },
                 message);
  if (err) return Fail(*err);
  PadTo(out, 8, 0);  // the header is a multiple of 8 octets (RFC 6275 §6.1.1)
  if (out.size() > kMaxMobilityHeader)
    return Fail(Error::Invalid("Mobility Header longer than 2048 bytes"));
  out[1] = uint8_t(out.size() / 8 - 1);
  if (addresses)
    w.PatchU16(4,
               Ipv6PseudoHeaderChecksum(addresses->src, addresses->dst, ipproto::kMobility, out));
  return out;
}

Result<MobilityHeader> DecodeMobilityHeader(std::span<const uint8_t> mh) {
  if (mh.size() < 8) return Fail(Bad("Mobility Header shorter than 8 bytes"));
  size_t declared = (size_t(mh[1]) + 1) * 8;
  if (declared != mh.size())
    return Fail(Bad("Mobility Header Len " + std::to_string(mh[1]) + " declares " +
                    std::to_string(declared) + " bytes but " + std::to_string(mh.size()) +
                    " are present"));
  MobilityHeader h;
  h.payload_proto = mh[0];
  uint8_t type = mh[2];
  h.checksum = LoadBe16(&mh[4]);
  size_t fixed = FixedLength(type);
  if (fixed == 0) {
    h.message = UnrecognizedMobilityMessage{type, {mh.begin() + 6, mh.end()}};
    return h;
  }
  if (mh.size() < fixed)
    return Fail(Bad("Mobility Header Len " + std::to_string(mh[1]) + " too small for MH type " +
                    std::to_string(type)));
  auto options = DecodeOptions(mh.subspan(fixed));
  if (!options) return Fail(options.error().Context("MH type " + std::to_string(type)));
  const uint8_t* d = mh.data() + 6;
  switch (type) {
    case mh_type::kBindingRefreshRequest:
      h.message = BindingRefreshRequest{std::move(*options)};
      break;
    case mh_type::kBindingUpdate:
      h.message = BindingUpdate{LoadBe16(d), LoadBe16(d + 2), LoadBe16(d + 4), std::move(*options)};
      break;
    case mh_type::kBindingAcknowledgement:
      h.message =
          BindingAcknowledgement{d[0], d[1], LoadBe16(d + 2), LoadBe16(d + 4), std::move(*options)};
      break;
    case mh_type::kBindingError: {
      BindingError e;
      e.status = d[0];
      std::copy(d + 2, d + 18, e.home_address.begin());
      e.options = std::move(*options);
      h.message = std::move(e);
      break;
    }
  }
  return h;
}

uint16_t ComputeMobilityHeaderChecksum(std::span<const uint8_t> mh,
                                       const ChecksumAddresses& addresses) {
  std::vector<uint8_t> copy(mh.begin(), mh.end());
  if (copy.size() >= 6) copy[4] = copy[5] = 0;
  return Ipv6PseudoHeaderChecksum(addresses.src, addresses.dst, ipproto::kMobility, copy);
}

bool VerifyMobilityHeaderChecksum(std::span<const uint8_t> mh, const ChecksumAddresses& addresses) {
  return mh.size() >= 6 &&
         Ipv6PseudoHeaderChecksum(addresses.src, addresses.dst, ipproto::kMobility, mh) == 0;
}

Result<AuthenticatorLocation> LocateAuthenticator(std::span<const uint8_t> mh) {
  if (mh.size() < 8 || (size_t(mh[1]) + 1) * 8 != mh.size())
    return Fail(Bad("malformed Mobility Header"));
  size_t fixed = FixedLength(mh[2]);
  if (fixed == 0 || fixed > mh.size()) return Fail(Bad("MH type carries no mobility options"));
  std::optional<AuthenticatorLocation> found;
  size_t pos = fixed;
  while (pos < mh.size()) {
    uint8_t type = mh[pos];
    if (type == mh_option::kPad1) {
      ++pos;
      continue;
    }
    if (pos + 2 > mh.size() || pos + 2 + mh[pos + 1] > mh.size())
      return Fail(Bad("mobility option overruns"));
    uint8_t len = mh[pos + 1];
    if (type != mh_option::kPadN) {
      if (found) return Fail(Bad("option after the Mobility Message Authentication option"));
      if (type == mh_option::kMobilityMessageAuthentication) {
        if (len < 5) return Fail(Bad("Mobility Message Authentication option shorter than 5"));
        found =
            AuthenticatorLocation{pos + 7, size_t(len) - 5, LoadBe32(&mh[pos + 3]), mh[pos + 2]};
      }
    }
    pos += 2 + len;
  }
  if (!found) return Fail(Bad("no Mobility Message Authentication option"));
  return *found;
}

Result<std::vector<uint8_t>> BuildMobilityPacket(const Ipv6Address& src, const Ipv6Address& dst,
                                                 std::optional<Ipv6Address> home_address_option,
                                                 std::optional<Ipv6Address> routing_home_address,
                                                 std::span<const uint8_t> mh) {
  std::vector<uint8_t> payload;
  uint8_t first = ipproto::kMobility;
  // RFC 8200 §4.1 order: Routing header before the Destination Options header
  // that is processed by the final destination.
  std::vector<uint8_t> dest_opts;
  if (home_address_option) {
    dest_opts = EncodeHomeAddressDestinationOptions(ipproto::kMobility, *home_address_option);
    first = ipproto::kDestinationOptions;
  }
  if (routing_home_address) {
    auto rh = EncodeType2RoutingHeader(first, *routing_home_address, 1);
    payload.insert(payload.end(), rh.begin(), rh.end());
    first = ipproto::kRouting;
  }
  payload.insert(payload.end(), dest_opts.begin(), dest_opts.end());
  payload.insert(payload.end(), mh.begin(), mh.end());
  Ipv6Header h;
  h.src = src;
  h.dst = dst;
  h.next_header = first;
  h.hop_limit = 64;
  return BuildIpv6Packet(h, payload);
}

Result<std::vector<uint8_t>> BuildBindingUpdatePacket(const Ipv6Address& care_of,
                                                      const Ipv6Address& home_agent,
                                                      const Ipv6Address& home_address,
                                                      const BindingUpdate& bu) {
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{home_address, home_agent});
  if (!mh) return Fail(mh.error());
  return BuildMobilityPacket(care_of, home_agent, home_address, std::nullopt, *mh);
}

Result<std::vector<uint8_t>> BuildBindingAcknowledgementPacket(const Ipv6Address& home_agent,
                                                               const Ipv6Address& care_of,
                                                               const Ipv6Address& home_address,
                                                               const BindingAcknowledgement& ba) {
  auto mh = EncodeMobilityHeader(ba, ChecksumAddresses{home_agent, home_address});
  if (!mh) return Fail(mh.error());
  return BuildMobilityPacket(home_agent, care_of, std::nullopt, home_address, *mh);
}

Result<MobilityPacket> ParseMobilityPacket(std::span<const uint8_t> ipv6_packet) {
  auto p = ParseIpv6Packet(ipv6_packet);
  if (!p) return Fail(p.error());
  auto u = FindUpperLayer(*p);
  if (!u) return Fail(u.error());
  if (u->protocol != ipproto::kMobility)
    return Fail(
        Bad("upper-layer protocol " + std::to_string(u->protocol) + " is not the Mobility Header"));
  auto h = DecodeMobilityHeader(u->data);
  if (!h) return Fail(h.error());
  if (!VerifyMobilityHeaderChecksum(u->data, {u->checksum_src, u->checksum_dst}))
    return Fail(Bad("Mobility Header checksum mismatch (pseudo-header " +
                    FormatIpv6(u->checksum_src) + " -> " + FormatIpv6(u->checksum_dst) + ")"));
  if (u->home_address && !std::holds_alternative<BindingUpdate>(h->message))
    return Fail(Bad(
        "Home Address option on a Mobility Header that is not a Binding Update (RFC 6275 §6.1)"));
  if (u->routing && !std::holds_alternative<BindingAcknowledgement>(h->message))
    return Fail(
        Bad("type 2 routing header on a Mobility Header that is not a Binding Acknowledgement"));
  return MobilityPacket{*u, u->data, std::move(*h)};
}

Result<MobilityPacket> ParseMobilityFrame(std::span<const uint8_t> frame) {
  auto f = ParseEthernetFrame(frame);
  if (!f) return Fail(f.error());
  if (f->ether_type != ethertype::kIpv6) return Fail(Bad("frame does not carry IPv6"));
  return ParseMobilityPacket(f->payload);
}

}  // namespace kagemusha::tunnel
