// RFC 4285 MN-HA authenticator over OpenSSL HMAC. See mh_auth.h.
#include "kagemusha/tunnel/mh_auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <array>

#include "kagemusha/common/coding.h"

namespace kagemusha::tunnel {
namespace {

Result<std::vector<uint8_t>> Authenticator(std::span<const uint8_t> mh,
                                           const AuthenticatorLocation& loc,
                                           const MhAuthParams& p) {
  std::vector<uint8_t> data;
  data.reserve(32 + loc.authenticator_offset);
  data.insert(data.end(), p.care_of.begin(), p.care_of.end());
  data.insert(data.end(), p.home_address.begin(), p.home_address.end());
  size_t mh_at = data.size();
  data.insert(data.end(), mh.begin(), mh.begin() + loc.authenticator_offset);
  data[mh_at + 4] = data[mh_at + 5] = 0;  // checksum counts as zero
  const EVP_MD* md = p.algorithm == MhAuthAlgorithm::kHmacSha1_96 ? EVP_sha1() : EVP_sha256();
  std::array<uint8_t, EVP_MAX_MD_SIZE> out{};
  unsigned int out_len = 0;
  if (!HMAC(md, p.key.data(), int(p.key.size()), data.data(), data.size(), out.data(), &out_len))
    return Fail(Error::Io("HMAC computation failed in OpenSSL"));
  size_t n = AuthenticatorLength(p.algorithm);
  if (out_len < n) return Fail(Error::Io("HMAC output shorter than the authenticator"));
  return std::vector<uint8_t>(out.begin(), out.begin() + n);
}

}  // namespace

size_t AuthenticatorLength(MhAuthAlgorithm algorithm) {
  return algorithm == MhAuthAlgorithm::kHmacSha1_96 ? 12 : 16;
}

Result<std::vector<uint8_t>> EncodeAuthenticatedMobilityHeader(const MobilityMessage& message,
                                                               const MhAuthParams& params,
                                                               const ChecksumAddresses& addresses) {
  if (params.key.empty()) return Fail(Error::Invalid("empty MN-HA key"));
  MobilityMessage m = message;
  MobilityOptions* options = std::visit(
      [](auto& msg) -> MobilityOptions* {
        if constexpr (requires { msg.options; })
          return &msg.options;
        else
          return nullptr;
      },
      m);
  if (!options) return Fail(Error::Invalid("this MH type carries no options to authenticate"));
  for (const auto& o : *options)
    if (std::holds_alternative<MobilityMessageAuthentication>(o))
      return Fail(
          Error::Invalid("message already carries a Mobility Message Authentication option"));
  options->push_back(MobilityMessageAuthentication{
      mh_auth_subtype::kMnHa, params.spi,
      std::vector<uint8_t>(AuthenticatorLength(params.algorithm), 0)});
  auto mh = EncodeMobilityHeader(m, std::nullopt);
  if (!mh) return Fail(mh.error());
  auto loc = LocateAuthenticator(*mh);
  if (!loc) return Fail(loc.error());
  auto auth = Authenticator(*mh, *loc, params);
  if (!auth) return Fail(auth.error());
  std::copy(auth->begin(), auth->end(), mh->begin() + loc->authenticator_offset);
  StoreBe16(mh->data() + 4,
            Ipv6PseudoHeaderChecksum(addresses.src, addresses.dst, ipproto::kMobility, *mh));
  return mh;
}

Status VerifyMobilityMessageAuthentication(std::span<const uint8_t> mh,
                                           const MhAuthParams& params) {
  auto loc = LocateAuthenticator(mh);
  if (!loc) return Fail(loc.error());
  if (loc->subtype != mh_auth_subtype::kMnHa)
    return Fail(Error::NotSupported("authentication subtype " + std::to_string(loc->subtype) +
                                    " is not MN-HA"));
  if (loc->spi != params.spi)
    return Fail(Error::Permission("authentication SPI " + std::to_string(loc->spi) +
                                  " does not match " + std::to_string(params.spi)));
  if (loc->authenticator_length != AuthenticatorLength(params.algorithm))
    return Fail(Error::Protocol("authenticator is " + std::to_string(loc->authenticator_length) +
                                " bytes, the algorithm produces " +
                                std::to_string(AuthenticatorLength(params.algorithm))));
  auto want = Authenticator(mh, *loc, params);
  if (!want) return Fail(want.error());
  if (CRYPTO_memcmp(want->data(), mh.data() + loc->authenticator_offset, want->size()) != 0)
    return Fail(Error::Permission(
        "Mobility Message Authentication mismatch (wrong key or altered message)"));
  return Ok();
}

}  // namespace kagemusha::tunnel
