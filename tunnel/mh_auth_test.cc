// RFC 4285 MN-HA authenticator tests. The expected authenticator is
// recomputed here from the RFC's definition (care-of | home | MH Data up to the
// SPI, checksum zero) with OpenSSL directly, so a change in what the codec
// authenticates is caught, not just a self-consistent round trip.
#include "kagemusha/tunnel/mh_auth.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

namespace kagemusha::tunnel {
namespace {

using Bytes = std::vector<uint8_t>;

const Ipv6Address kHoa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10};
const Ipv6Address kCoa = {0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20};
const Ipv6Address kHa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01};
const Bytes kKey = {'k', 'a', 'g', 'e', 'm', 'u', 's', 'h', 'a', '-', 't', 'e', 's', 't'};

MhAuthParams Params(MhAuthAlgorithm alg = MhAuthAlgorithm::kHmacSha256_128) {
  return MhAuthParams{0x00000100, kKey, kCoa, kHoa, alg};
}

BindingUpdate SampleBu() {
  return BindingUpdate{17,
                       bu_flag::kAcknowledge | bu_flag::kHomeRegistration,
                       60,
                       {Ipv4HomeAddress{24, false, {192, 0, 2, 10}}}};
}

TEST(MobilityMessageAuthentication, MatchesRfc4285Definition) {
  auto mh = EncodeAuthenticatedMobilityHeader(SampleBu(), Params(), {kHoa, kHa});
  ASSERT_TRUE(mh) << mh.error().message();
  // Layout: 12 fixed + IPv4 HoA (8) at 12, Pad1 at 20, auth option at 21
  // (4n+1): type 9, length 5+16, subtype 1, SPI, 16-byte authenticator -> 42,
  // then padding to 48.
  ASSERT_EQ(mh->size(), 48u);
  EXPECT_EQ((*mh)[20], mh_option::kPad1);
  EXPECT_EQ((*mh)[21], mh_option::kMobilityMessageAuthentication);
  EXPECT_EQ((*mh)[22], 21);
  EXPECT_EQ((*mh)[23], mh_auth_subtype::kMnHa);
  Bytes data(kCoa.begin(), kCoa.end());
  data.insert(data.end(), kHoa.begin(), kHoa.end());
  data.insert(data.end(), mh->begin(), mh->begin() + 28);  // through the SPI
  data[32 + 4] = data[32 + 5] = 0;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  HMAC(EVP_sha256(), kKey.data(), int(kKey.size()), data.data(), data.size(), md, &n);
  EXPECT_EQ(Bytes(mh->begin() + 28, mh->begin() + 44), Bytes(md, md + 16));
  EXPECT_TRUE(VerifyMobilityHeaderChecksum(*mh, {kHoa, kHa}));
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(*mh, Params()));
  auto decoded = DecodeMobilityHeader(*mh);
  ASSERT_TRUE(decoded);
  auto& bu = std::get<BindingUpdate>(decoded->message);
  ASSERT_EQ(bu.options.size(), 2u);
  EXPECT_EQ(std::get<MobilityMessageAuthentication>(bu.options[1]).spi, 0x100u);
}

TEST(MobilityMessageAuthentication, Sha1VariantUses96BitAuthenticator) {
  auto p = Params(MhAuthAlgorithm::kHmacSha1_96);
  auto mh = EncodeAuthenticatedMobilityHeader(SampleBu(), p, {kHoa, kHa});
  ASSERT_TRUE(mh);
  EXPECT_EQ((*mh)[22], 5 + 12);
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(*mh, p));
  // The SHA-256 verifier refuses a 96-bit authenticator outright.
  EXPECT_EQ(VerifyMobilityMessageAuthentication(*mh, Params()).error().code(), EPROTO);
}

TEST(MobilityMessageAuthentication, RejectsWrongKeySpiAddressesOrAnyAlteredByte) {
  auto mh = EncodeAuthenticatedMobilityHeader(SampleBu(), Params(), {kHoa, kHa});
  ASSERT_TRUE(mh);
  Bytes other_key = {'x'};
  auto p = Params();
  p.key = other_key;
  EXPECT_EQ(VerifyMobilityMessageAuthentication(*mh, p).error().code(), EPERM);
  p = Params();
  p.spi = 0x101;
  EXPECT_EQ(VerifyMobilityMessageAuthentication(*mh, p).error().code(), EPERM);
  p = Params();
  p.care_of = kHa;  // replayed from another care-of address
  EXPECT_FALSE(VerifyMobilityMessageAuthentication(*mh, p));
  for (size_t i = 0; i < 44; ++i) {  // every byte up to the trailing padding...
    if (i == 4 || i == 5) continue;  // ...except the checksum, which RFC 4285 zeroes
    Bytes m = *mh;
    m[i] ^= 0x01;
    EXPECT_FALSE(VerifyMobilityMessageAuthentication(m, Params())) << "byte " << i;
  }
  // The checksum is excluded from the authenticated data, so recomputing it
  // (as a NAT-free path never does, but a relay might) keeps the MAC valid.
  Bytes m = *mh;
  m[4] ^= 0xff;
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(m, Params()));
}

TEST(MobilityMessageAuthentication, RefusesMessagesWithoutOrWithTwoAuthOptions) {
  auto plain = EncodeMobilityHeader(SampleBu(), ChecksumAddresses{kHoa, kHa});
  EXPECT_FALSE(VerifyMobilityMessageAuthentication(*plain, Params()));
  BindingUpdate already = SampleBu();
  already.options.push_back(MobilityMessageAuthentication{1, 1, Bytes(16, 0)});
  EXPECT_EQ(EncodeAuthenticatedMobilityHeader(already, Params(), {kHoa, kHa}).error().code(),
            EINVAL);
  auto p = Params();
  Bytes empty;
  p.key = empty;
  EXPECT_FALSE(EncodeAuthenticatedMobilityHeader(SampleBu(), p, {kHoa, kHa}));
  EXPECT_FALSE(EncodeAuthenticatedMobilityHeader(UnrecognizedMobilityMessage{1, Bytes(10, 0)},
                                                 Params(), {kHoa, kHa}));
}

TEST(MobilityMessageAuthentication, AuthenticatesBindingAckOverRoutingHeaderPacket) {
  BindingAcknowledgement ba{
      ba_status::kAccepted,
      0,
      17,
      60,
      {Ipv4AddressAcknowledgement{ipv4_ack_status::kSuccess, 24, {192, 0, 2, 10}}}};
  auto mh = EncodeAuthenticatedMobilityHeader(ba, Params(), {kHa, kHoa});
  ASSERT_TRUE(mh);
  auto pkt = BuildMobilityPacket(kHa, kCoa, std::nullopt, kHoa, *mh);
  auto parsed = ParseMobilityPacket(*pkt);
  ASSERT_TRUE(parsed) << parsed.error().message();
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(parsed->mh, Params()));
}

}  // namespace
}  // namespace kagemusha::tunnel
