// Mobility Header codec tests: known-answer layouts built by hand from
// RFC 6275 §6.1/6.2 and RFC 5555 §3, round trips, alignment, and a table of
// malformed inputs every one of which must be rejected.
#include <gtest/gtest.h>

#include <algorithm>

#include "kagemusha/tunnel/mobility_header.h"

namespace kagemusha::tunnel {
namespace {

using Bytes = std::vector<uint8_t>;

const Ipv6Address kHoa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10};
const Ipv6Address kCoa = {0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20};
const Ipv6Address kHa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01};

// Offset of the first option of `type` in an encoded MH whose options start at
// `first`, walking the TLVs the way a receiver does.
size_t OptionOffset(const Bytes& mh, size_t first, uint8_t type) {
  size_t pos = first;
  while (pos < mh.size()) {
    if (mh[pos] == type) return pos;
    pos += mh[pos] == 0 ? 1 : 2 + mh[pos + 1];
  }
  return 0;
}

TEST(BindingUpdate, EncodesKnownAnswerLayout) {
  BindingUpdate bu;
  bu.sequence = 0x1234;
  bu.flags = bu_flag::kAcknowledge | bu_flag::kHomeRegistration;
  bu.lifetime = 0x0100;
  bu.options.push_back(Ipv4HomeAddress{24, false, {192, 0, 2, 1}});
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{kHoa, kHa});
  ASSERT_TRUE(mh) << mh.error().message();
  // Payload Proto 59, Header Len 2 (24 bytes), type 5, reserved, checksum,
  // seq, flags A|H, lifetime, IPv4 HoA option at 12 (4n), then PadN(2) to 24.
  Bytes want = {0x3b, 0x02, 0x05, 0x00, 0x00, 0x00, 0x12, 0x34, 0xc0, 0x00, 0x01, 0x00,
                0x1d, 0x06, 0x60, 0x00, 192,  0,    2,    1,    0x01, 0x02, 0x00, 0x00};
  Bytes got = *mh;
  got[4] = got[5] = 0;
  EXPECT_EQ(got, want);
  EXPECT_TRUE(VerifyMobilityHeaderChecksum(*mh, {kHoa, kHa}));
  EXPECT_EQ(ComputeMobilityHeaderChecksum(*mh, {kHoa, kHa}), uint16_t((*mh)[4] << 8 | (*mh)[5]));
}

TEST(BindingAcknowledgement, EncodesKnownAnswerLayout) {
  BindingAcknowledgement ba;
  ba.status = ba_status::kAccepted;
  ba.flags = ba_flag::kKeyManagement;
  ba.sequence = 7;
  ba.lifetime = 0x0040;
  ba.options.push_back(Ipv4AddressAcknowledgement{ipv4_ack_status::kSuccess, 24, {192, 0, 2, 1}});
  auto mh = EncodeMobilityHeader(ba, std::nullopt);
  ASSERT_TRUE(mh);
  Bytes want = {0x3b, 0x02, 0x06, 0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x07, 0x00, 0x40,
                0x1e, 0x06, 0x00, 0x60, 192,  0,    2,    1,    0x01, 0x02, 0x00, 0x00};
  EXPECT_EQ(*mh, want);
}

TEST(BindingRefreshRequest, IsEightBytesWithoutOptions) {
  auto mh = EncodeMobilityHeader(BindingRefreshRequest{}, std::nullopt);
  ASSERT_TRUE(mh);
  EXPECT_EQ(*mh, (Bytes{0x3b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}));
  auto d = DecodeMobilityHeader(*mh);
  ASSERT_TRUE(d);
  EXPECT_TRUE(std::holds_alternative<BindingRefreshRequest>(d->message));
}

TEST(BindingRefreshRequest, RoundTripsWithOptionsAndChecksum) {
  BindingRefreshRequest brr{{BindingRefreshAdvice{8}, UnknownMobilityOption{200, {1, 2, 3}}}};
  auto mh = EncodeMobilityHeader(brr, ChecksumAddresses{kHa, kHoa});
  ASSERT_TRUE(mh);
  EXPECT_EQ(mh->size() % 8, 0u);
  EXPECT_TRUE(VerifyMobilityHeaderChecksum(*mh, {kHa, kHoa}));
  auto d = DecodeMobilityHeader(*mh);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(std::get<BindingRefreshRequest>(d->message), brr);
}

TEST(BindingUpdate, PreservesAllSixteenFlagBits) {
  BindingUpdate bu{1, 0xffff, 2, {}};
  auto d = DecodeMobilityHeader(*EncodeMobilityHeader(bu, std::nullopt));
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<BindingUpdate>(d->message).flags, 0xffff);
}

TEST(BindingError, RoundTripsHomeAddressAndStatus) {
  BindingError be{be_status::kUnrecognizedMhType, kHoa, {}};
  auto mh = EncodeMobilityHeader(be, ChecksumAddresses{kHa, kCoa});
  ASSERT_TRUE(mh);
  EXPECT_EQ(mh->size(), 24u);
  EXPECT_EQ((*mh)[1], 2);
  EXPECT_EQ((*mh)[6], be_status::kUnrecognizedMhType);
  auto d = DecodeMobilityHeader(*mh);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<BindingError>(d->message), be);
}

TEST(BindingUpdate, RoundTripsEveryOptionKind) {
  BindingUpdate bu;
  bu.sequence = 65535;
  bu.flags = bu_flag::kAcknowledge | bu_flag::kHomeRegistration | bu_flag::kKeyManagement |
             bu_flag::kForceUdp;
  bu.lifetime = 900;
  bu.options = {BindingRefreshAdvice{30},
                AlternateCareOfAddress{kCoa},
                NonceIndices{0x0102, 0x0304},
                BindingAuthorizationData{{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}},
                Ipv4HomeAddress{32, true, {198, 51, 100, 7}},
                Ipv4CareOfAddress{{203, 0, 113, 9}},
                UnknownMobilityOption{31, {0, 0, 0x0e, 0x10, 0, 0}},
                MobilityMessageAuthentication{mh_auth_subtype::kMnHa, 0xdeadbeef, Bytes(16, 0xab)}};
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{kHoa, kHa});
  ASSERT_TRUE(mh) << mh.error().message();
  EXPECT_EQ(mh->size() % 8, 0u);
  EXPECT_EQ(mh->size(), (size_t((*mh)[1]) + 1) * 8);
  auto d = DecodeMobilityHeader(*mh);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->payload_proto, 59);
  EXPECT_EQ(std::get<BindingUpdate>(d->message), bu);
}

TEST(BindingUpdate, AlignsEachOptionPerRfc6275) {
  BindingUpdate bu;
  bu.options = {NonceIndices{1, 2}, AlternateCareOfAddress{kCoa},
                BindingAuthorizationData{{9, 9, 9}}, Ipv4HomeAddress{24, false, {192, 0, 2, 1}},
                MobilityMessageAuthentication{mh_auth_subtype::kMnHa, 1, Bytes(12, 1)}};
  auto mh = EncodeMobilityHeader(bu, std::nullopt);
  ASSERT_TRUE(mh);
  EXPECT_EQ(OptionOffset(*mh, 12, mh_option::kNonceIndices) % 2, 0u);
  EXPECT_EQ(OptionOffset(*mh, 12, mh_option::kAlternateCareOfAddress) % 8, 6u);
  EXPECT_EQ(OptionOffset(*mh, 12, mh_option::kBindingAuthorizationData) % 8, 2u);
  EXPECT_EQ(OptionOffset(*mh, 12, mh_option::kIpv4HomeAddress) % 4, 0u);
  EXPECT_EQ(OptionOffset(*mh, 12, mh_option::kMobilityMessageAuthentication) % 4, 1u);
}

TEST(BindingUpdate, UsesPad1ForASingleByteGap) {
  // After the 12-byte fixed part the auth option needs 4n+1: one Pad1.
  BindingUpdate bu;
  bu.options = {MobilityMessageAuthentication{mh_auth_subtype::kMnHa, 5, Bytes(12, 0)}};
  auto mh = EncodeMobilityHeader(bu, std::nullopt);
  ASSERT_TRUE(mh);
  EXPECT_EQ((*mh)[12], mh_option::kPad1);
  EXPECT_EQ((*mh)[13], mh_option::kMobilityMessageAuthentication);
  EXPECT_EQ((*mh)[14], 17);
}

TEST(MobilityHeader, SkipsPaddingAndKeepsUnknownOptions) {
  // BA with Pad1, PadN(0), an unknown option 99 len 1, PadN to 24 bytes.
  Bytes mh = {0x3b, 0x02, 0x06, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x01, 0x00, 0x00,
              0x00, 0x01, 0x00, 0x63, 0x01, 0xaa, 0x01, 0x03, 0x00, 0x00, 0x00, 0x00};
  auto d = DecodeMobilityHeader(mh);
  ASSERT_TRUE(d) << d.error().message();
  auto& ba = std::get<BindingAcknowledgement>(d->message);
  EXPECT_EQ(ba.status, ba_status::kReasonUnspecified);
  ASSERT_EQ(ba.options.size(), 1u);
  EXPECT_EQ(std::get<UnknownMobilityOption>(ba.options[0]), (UnknownMobilityOption{99, {0xaa}}));
}

TEST(MobilityHeader, AcceptsMisalignedOptionsFromLenientSenders) {
  // Alignment is a sender rule (RFC 6275 §6.2.1); a Nonce Indices at 8n+1 is
  // still decoded.
  Bytes mh = {0x3b, 0x01, 0x05, 0, 0, 0, 0, 1,    0, 0, 0, 1,
              0x00, 0x04, 0x04, 0, 1, 0, 2, 0x00, 0, 0, 0, 0};
  mh[1] = 2;
  auto d = DecodeMobilityHeader(mh);
  ASSERT_TRUE(d) << d.error().message();
  auto& bu = std::get<BindingUpdate>(d->message);
  ASSERT_EQ(bu.options.size(), 1u);
  EXPECT_EQ(std::get<NonceIndices>(bu.options[0]), (NonceIndices{1, 2}));
}

TEST(MobilityHeader, ReportsUnrecognizedTypeWithItsData) {
  Bytes mh = {0x3b, 0x01, 0x01, 0x00, 0x00, 0x00, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8};  // HoTI
  auto d = DecodeMobilityHeader(mh);
  ASSERT_TRUE(d);
  auto& u = std::get<UnrecognizedMobilityMessage>(d->message);
  EXPECT_EQ(u.mh_type, mh_type::kHomeTestInit);
  EXPECT_EQ(u.data.size(), 10u);
  auto again = EncodeMobilityHeader(u, std::nullopt);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, mh);
}

TEST(MobilityHeader, ChecksumDetectsAnyFlippedBitAndWrongPseudoHeader) {
  BindingUpdate bu{3, bu_flag::kAcknowledge, 10, {Ipv4HomeAddress{24, false, {192, 0, 2, 1}}}};
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{kHoa, kHa});
  ASSERT_TRUE(mh);
  ASSERT_TRUE(VerifyMobilityHeaderChecksum(*mh, {kHoa, kHa}));
  EXPECT_FALSE(VerifyMobilityHeaderChecksum(*mh, {kCoa, kHa}));  // CoA instead of HoA
  for (size_t i = 0; i < mh->size(); ++i) {
    Bytes m = *mh;
    m[i] ^= 0x10;
    EXPECT_FALSE(VerifyMobilityHeaderChecksum(m, {kHoa, kHa})) << "byte " << i;
  }
}

struct Malformed {
  const char* name;
  Bytes mh;
};

class MobilityHeaderMalformed : public ::testing::TestWithParam<Malformed> {};

TEST_P(MobilityHeaderMalformed, IsRejected) {
  auto d = DecodeMobilityHeader(GetParam().mh);
  ASSERT_FALSE(d) << GetParam().name;
  EXPECT_EQ(d.error().code(), EPROTO);
}

// A valid 16-byte BU header prefix (Header Len 1), options from byte 12.
Bytes Bu16(std::initializer_list<uint8_t> opts) {
  Bytes b = {0x3b, 0x01, 0x05, 0, 0, 0, 0, 1, 0x80, 0, 0, 4};
  b.reserve(64);  // (also sidesteps a g++ 12 -Warray-bounds false positive on insert)
  for (uint8_t o : opts) b.push_back(o);
  return b;
}
Bytes Bu24(std::initializer_list<uint8_t> opts) {
  Bytes b = Bu16(opts);
  b[1] = 2;
  return b;
}

INSTANTIATE_TEST_SUITE_P(
    Table, MobilityHeaderMalformed,
    ::testing::Values(
        Malformed{"empty", {}}, Malformed{"truncated_header", {0x3b, 0x00, 0x05, 0x00, 0x00}},
        Malformed{"len_claims_more_than_present", {0x3b, 0x01, 0x00, 0, 0, 0, 0, 0}},
        Malformed{"len_claims_less_than_present",
                  Bu16({0x01, 0x02, 0, 0, 0x01, 0x02, 0, 0, 0x01, 0x02, 0, 0})},
        Malformed{"len_in_bytes_not_units",
                  {0x3b, 0x10, 0x05, 0, 0, 0, 0, 1, 0, 0, 0, 4, 1, 2, 0, 0}},
        Malformed{"bu_with_len_zero_too_small", {0x3b, 0x00, 0x05, 0, 0, 0, 0, 1}},
        Malformed{"be_with_len_one_too_small",
                  {0x3b, 0x01, 0x07, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
        Malformed{"option_overruns_header", Bu16({0x01, 0x05, 0, 0})},
        Malformed{"option_missing_length_byte", Bu16({0x01, 0x00, 0x00, 0x02})},
        Malformed{"bra_wrong_length", Bu16({0x02, 0x01, 0x00, 0x00})},
        Malformed{"nonce_indices_wrong_length", Bu16({0x04, 0x02, 0x00, 0x00})},
        Malformed{"alt_coa_wrong_length", Bu24({0x03, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})},
        Malformed{"ipv4_hoa_wrong_length",
                  Bu24({0x1d, 0x05, 0x60, 0, 192, 0, 2, 0, 0x01, 0x01, 0})},
        Malformed{"ipv4_hoa_prefix_above_32",
                  Bu24({0x1d, 0x06, 0xfc, 0x00, 192, 0, 2, 1, 0x01, 0x02, 0, 0})},
        Malformed{"ipv4_ack_wrong_length",
                  Bu24({0x1e, 0x07, 0, 0x60, 192, 0, 2, 1, 0, 0x00, 0x00, 0x00})},
        Malformed{"ipv4_coa_wrong_length", Bu16({0x20, 0x02, 0, 0})},
        Malformed{"auth_option_too_short", Bu16({0x09, 0x02, 1, 0})},
        Malformed{"option_after_auth", Bu24({0x09, 0x05, 1, 0, 0, 0, 1, 0x02, 0x02, 0, 1, 0})}),
    [](const ::testing::TestParamInfo<Malformed>& p) { return std::string(p.param.name); });

TEST(MobilityHeader, RejectsEncodingAuthOptionThatIsNotLast) {
  BindingUpdate bu;
  bu.options = {MobilityMessageAuthentication{1, 1, Bytes(12, 0)}, NonceIndices{1, 1}};
  auto mh = EncodeMobilityHeader(bu, std::nullopt);
  ASSERT_FALSE(mh);
  EXPECT_EQ(mh.error().code(), EINVAL);
}

TEST(MobilityHeader, RejectsEncodingOversizedOption) {
  BindingUpdate bu;
  bu.options = {BindingAuthorizationData{Bytes(256, 0)}};
  EXPECT_FALSE(EncodeMobilityHeader(bu, std::nullopt));
}

TEST(MobilityHeader, RejectsEncodingMoreThan2048Bytes) {
  BindingUpdate bu;
  for (int i = 0; i < 12; ++i) bu.options.push_back(BindingAuthorizationData{Bytes(250, 0)});
  auto mh = EncodeMobilityHeader(bu, std::nullopt);
  ASSERT_FALSE(mh);
}

TEST(MobilityHeader, LocatesAuthenticatorAfterSpi) {
  BindingUpdate bu;
  bu.options = {Ipv4HomeAddress{24, false, {192, 0, 2, 1}},
                MobilityMessageAuthentication{1, 0x01020304, Bytes(16, 7)}};
  auto mh = EncodeMobilityHeader(bu, std::nullopt);
  ASSERT_TRUE(mh);
  auto loc = LocateAuthenticator(*mh);
  ASSERT_TRUE(loc) << loc.error().message();
  EXPECT_EQ(loc->spi, 0x01020304u);
  EXPECT_EQ(loc->authenticator_length, 16u);
  EXPECT_EQ((*mh)[loc->authenticator_offset - 5], 1);  // subtype just before the SPI
  EXPECT_TRUE(std::all_of(mh->begin() + loc->authenticator_offset,
                          mh->begin() + loc->authenticator_offset + 16,
                          [](uint8_t b) { return b == 7; }));
  auto no_auth = EncodeMobilityHeader(BindingUpdate{}, std::nullopt);
  EXPECT_FALSE(LocateAuthenticator(*no_auth));
}

// ---- Whole packets -------------------------------------------------------------

TEST(MobilityPacket, BindingUpdateCarriesHaoAndChecksumsOverHomeAddress) {
  BindingUpdate bu{42,
                   bu_flag::kAcknowledge | bu_flag::kHomeRegistration,
                   150,
                   {Ipv4HomeAddress{24, false, {192, 0, 2, 10}}}};
  auto pkt = BuildBindingUpdatePacket(kCoa, kHa, kHoa, bu);
  ASSERT_TRUE(pkt);
  // IPv6 next header = Destination Options; HAO type C9 at byte 40+6.
  EXPECT_EQ((*pkt)[6], ipproto::kDestinationOptions);
  EXPECT_EQ((*pkt)[40], ipproto::kMobility);
  EXPECT_EQ((*pkt)[46], 0xc9);
  auto p = ParseMobilityPacket(*pkt);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->ip.header.src, kCoa);
  EXPECT_EQ(p->ip.home_address, kHoa);
  EXPECT_EQ(p->ip.checksum_src, kHoa);
  EXPECT_EQ(std::get<BindingUpdate>(p->header.message), bu);
}

TEST(MobilityPacket, BindingAckCarriesRh2AndChecksumsOverHomeAddress) {
  BindingAcknowledgement ba{ba_status::kAccepted, 0, 42, 150, {}};
  auto pkt = BuildBindingAcknowledgementPacket(kHa, kCoa, kHoa, ba);
  ASSERT_TRUE(pkt);
  EXPECT_EQ((*pkt)[6], ipproto::kRouting);
  EXPECT_EQ((*pkt)[42], 2);  // routing type
  EXPECT_EQ((*pkt)[43], 1);  // segments left
  auto p = ParseMobilityPacket(*pkt);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->ip.header.dst, kCoa);
  EXPECT_EQ(p->ip.checksum_dst, kHoa);
  EXPECT_EQ(std::get<BindingAcknowledgement>(p->header.message), ba);
}

TEST(MobilityPacket, RejectsChecksumComputedOverCareOfAddress) {
  BindingUpdate bu{1, bu_flag::kAcknowledge, 1, {}};
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{kCoa, kHa});  // the classic mistake
  auto pkt = BuildMobilityPacket(kCoa, kHa, kHoa, std::nullopt, *mh);
  ASSERT_TRUE(pkt);
  auto p = ParseMobilityPacket(*pkt);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message().find("checksum"), std::string::npos);
}

TEST(MobilityPacket, RejectsHomeAddressOptionOnBindingAck) {
  BindingAcknowledgement ba{};
  auto mh = EncodeMobilityHeader(ba, ChecksumAddresses{kHoa, kHa});
  auto pkt = BuildMobilityPacket(kCoa, kHa, kHoa, std::nullopt, *mh);
  EXPECT_FALSE(ParseMobilityPacket(*pkt));
}

TEST(MobilityPacket, RejectsTrailingBytesAfterMobilityHeader) {
  BindingUpdate bu{1, 0, 1, {}};
  auto mh = EncodeMobilityHeader(bu, ChecksumAddresses{kHoa, kHa});
  mh->insert(mh->end(), 8, 0);
  auto pkt = BuildMobilityPacket(kCoa, kHa, kHoa, std::nullopt, *mh);
  EXPECT_FALSE(ParseMobilityPacket(*pkt));
}

TEST(MobilityPacket, ParsesFromVlanTaggedEthernetFrame) {
  BindingUpdate bu{9, bu_flag::kAcknowledge, 20, {}};
  auto pkt = BuildBindingUpdatePacket(kCoa, kHa, kHoa, bu);
  auto frame =
      BuildEthernetFrame({2, 0, 0, 0, 0, 1}, {2, 0, 0, 0, 0, 2}, ethertype::kIpv6, *pkt, 0x0064);
  auto p = ParseMobilityFrame(frame);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(std::get<BindingUpdate>(p->header.message).sequence, 9);
  auto arp = BuildEthernetFrame({2, 0, 0, 0, 0, 1}, {2, 0, 0, 0, 0, 2}, ethertype::kArp, *pkt);
  EXPECT_FALSE(ParseMobilityFrame(arp));
}

TEST(MobilityPacket, EveryTruncationOfAValidPacketIsRejected) {
  BindingUpdate bu{9, bu_flag::kAcknowledge, 20, {Ipv4HomeAddress{24, false, {192, 0, 2, 1}}}};
  auto pkt = BuildBindingUpdatePacket(kCoa, kHa, kHoa, bu);
  for (size_t n = 0; n < pkt->size(); ++n)
    EXPECT_FALSE(ParseMobilityPacket(std::span<const uint8_t>(pkt->data(), n))) << "length " << n;
}

}  // namespace
}  // namespace kagemusha::tunnel
