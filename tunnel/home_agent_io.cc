// The home agent's OS-facing helpers: key files (--key) and the raw IPv4
// sender that hands decapsulated IPv4 packets to the kernel. See home_agent.h.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>

#include "kagemusha/tunnel/home_agent.h"

namespace kagemusha::tunnel {
namespace {

bool AllDigits(const std::string& s) {
  return !s.empty() && s.size() <= 10 &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Hex text (optionally ending in one newline) decodes; anything else is raw.
std::vector<uint8_t> DecodeKeyFile(const std::vector<uint8_t>& raw) {
  size_t n = raw.size();
  if (n > 0 && raw[n - 1] == '\n') --n;
  if (n > 0 && raw[n - 1] == '\r') --n;
  bool hex = n > 0 && n % 2 == 0;
  for (size_t i = 0; hex && i < n; ++i) hex = HexValue(char(raw[i])) >= 0;
  if (!hex) return raw;
  std::vector<uint8_t> out(n / 2);
  for (size_t i = 0; i < n / 2; ++i) {
    out[i] = uint8_t(HexValue(char(raw[2 * i])) << 4 | HexValue(char(raw[2 * i + 1])));
  }
  return out;
}

}  // namespace

Result<HomeKey> LoadHomeKey(const std::string& spec) {
  // HOA:SPI:KEYFILE where HOA itself has colons: try every split whose left
  // part is an IPv6 address and whose middle part is a decimal SPI.
  std::string hoa_text, spi_text, file;
  bool found = false;
  if (!spec.empty() && spec[0] == '[') {
    auto close = spec.find("]:");
    auto second = close == std::string::npos ? std::string::npos : spec.find(':', close + 2);
    if (second != std::string::npos) {
      hoa_text = spec.substr(1, close - 1);
      spi_text = spec.substr(close + 2, second - close - 2);
      file = spec.substr(second + 1);
      found = ParseIpv6(hoa_text).has_value() && AllDigits(spi_text);
    }
  } else {
    for (size_t i = spec.find(':'); i != std::string::npos && !found; i = spec.find(':', i + 1)) {
      size_t j = spec.find(':', i + 1);
      if (j == std::string::npos) break;
      std::string h = spec.substr(0, i);
      std::string s = spec.substr(i + 1, j - i - 1);
      if (ParseIpv6(h) && AllDigits(s)) {
        hoa_text = h;
        spi_text = s;
        file = spec.substr(j + 1);
        found = true;
      }
    }
  }
  if (!found || file.empty()) {
    return Fail(Error::Invalid("--key '" + spec +
                               "' is not HOA:SPI:KEYFILE (e.g. 2001:db8:a::20:1000:/etc/ha.key)"));
  }
  unsigned long spi = std::stoul(spi_text);
  if (spi > 0xffffffffUL || spi < 256) {
    // RFC 4285 §5.1 / RFC 4301: SPIs 0-255 are reserved.
    return Fail(Error::Invalid("--key " + hoa_text + ": SPI " + spi_text +
                               " is out of range (256..4294967295)"));
  }
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return Fail(Error::Errno(errno, "--key " + hoa_text + ": opening key file " + file));
  struct stat st {};
  if (::fstat(fd, &st) < 0) {
    int e = errno;
    ::close(fd);
    return Fail(Error::Errno(e, "--key: stat " + file));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Fail(Error::Invalid("--key: key file " + file + " is not a regular file"));
  }
  if (st.st_mode & 077) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
    return Fail(Error::Permission("--key: key file " + file + " has mode " + mode +
                                  "; it must not be accessible by group or others "
                                  "(chmod 600 " +
                                  file + ")"));
  }
  if (st.st_size > 4096) {
    ::close(fd);
    return Fail(Error::Invalid("--key: key file " + file + " is larger than 4096 bytes"));
  }
  std::vector<uint8_t> raw(size_t(st.st_size));
  size_t got = 0;
  while (got < raw.size()) {
    ssize_t n = ::read(fd, raw.data() + got, raw.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += size_t(n);
  }
  ::close(fd);
  raw.resize(got);
  HomeKey k;
  k.home_address = *ParseIpv6(hoa_text);
  k.spi = uint32_t(spi);
  k.key = DecodeKeyFile(raw);
  std::fill(raw.begin(), raw.end(), 0);
  if (k.key.size() < 16) {
    return Fail(Error::Invalid("--key: key file " + file + " holds " +
                               std::to_string(k.key.size()) +
                               " key bytes; at least 16 are required"));
  }
  return k;
}

Result<std::unique_ptr<Ipv4RawSender>> Ipv4RawSender::Open() {
  int fd = ::socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_RAW);
  if (fd < 0) return Fail(Error::Errno(errno, "raw IPv4 socket (IPPROTO_RAW)"));
  return std::unique_ptr<Ipv4RawSender>(new Ipv4RawSender(fd));
}

Ipv4RawSender::~Ipv4RawSender() {
  if (fd_ >= 0) ::close(fd_);
}

Status Ipv4RawSender::Send(std::span<const uint8_t> packet) {
  if (packet.size() < 20 || (packet[0] >> 4) != 4) {
    return Fail(Error::Invalid("not an IPv4 packet"));
  }
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  std::memcpy(&sa.sin_addr, packet.data() + 16, 4);
  if (::sendto(fd_, packet.data(), packet.size(), 0, reinterpret_cast<sockaddr*>(&sa), sizeof sa) <
      0) {
    char text[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &sa.sin_addr, text, sizeof text);
    return Fail(Error::Errno(errno, std::string("raw IPv4 send to ") + text));
  }
  return Ok();
}

}  // namespace kagemusha::tunnel
