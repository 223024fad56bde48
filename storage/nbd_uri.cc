// NBD URI parsing and printing after NetworkBlockDevice/nbd doc/uri.md and
// RFC 3986. Pure: no I/O, no logging (also built into the fuzz library).
//
//   nbd://host[:port][/export]            TCP, port defaults to 10809
//   nbd://[2001:db8::1]:10809/export      IPv6 literal in brackets (RFC 2732)
//   nbd+unix:///export?socket=/path       Unix domain socket
//
// The export name is the path without its leading '/', percent-decoded, so
// "nbd://h//disk" names "/disk". nbds:// and nbds+unix:// (TLS) are refused
// with an explicit message, as uri.md asks of clients without TLS. Unknown
// query parameters are refused too (uri.md: "SHOULD be diagnosed"), except
// experimental "x-" ones, which are ignored. Userinfo is accepted and
// dropped: it only matters for TLS, and ToString never prints it.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <string_view>

#include "kagemusha/storage/nbd_client.h"
#include "kagemusha/storage/nbd_protocol.h"

namespace kagemusha::storage {
namespace {

// The URI as errors show it: without any user information (user:password@),
// which must not reach a log.
std::string Redacted(const std::string& uri) {
  // Up to the last '@' of the whole URI: a password may hold '/', '?' or
  // '#', and hiding part of an export name that holds '@' does no harm.
  const size_t start = uri.find("://");
  if (start == std::string::npos) return uri;
  const size_t at = uri.rfind('@');
  if (at == std::string::npos || at < start + 3) return uri;
  return uri.substr(0, start + 3) + "..." + uri.substr(at);
}

Error Bad(const std::string& uri, const std::string& why) {
  return Error::Invalid("bad NBD URI '" + Redacted(uri) + "': " + why);
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Decodes %XX escapes. `allow_nul` permits a decoded NUL (abstract sockets).
Result<std::string> PercentDecode(std::string_view s, bool allow_nul, const std::string& uri,
                                  const char* what) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    if (i + 2 >= s.size()) {
      return Fail(Bad(uri, std::string("truncated percent-escape in ") + what));
    }
    int hi = HexValue(s[i + 1]);
    int lo = HexValue(s[i + 2]);
    if (hi < 0 || lo < 0) return Fail(Bad(uri, std::string("bad percent-escape in ") + what));
    char c = char(hi << 4 | lo);
    if (c == '\0' && !allow_nul) {
      return Fail(Bad(uri, std::string(what) + " contains an encoded NUL byte"));
    }
    out += c;
    i += 2;
  }
  return out;
}

bool IsUnreserved(unsigned char c) {
  return std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

std::string PercentEncode(std::string_view s, std::string_view keep) {
  static constexpr char kDigits[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (IsUnreserved(c) || keep.find(char(c)) != std::string_view::npos) {
      out += char(c);
    } else {
      out += '%';
      out += kDigits[c >> 4];
      out += kDigits[c & 0xf];
    }
  }
  return out;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

Result<NbdUri> ParseNbdUri(const std::string& uri) {
  for (unsigned char c : uri) {
    if (c <= 0x20 || c >= 0x7f) {
      return Fail(Bad(uri, "contains spaces or non-ASCII characters; percent-encode them"));
    }
  }
  size_t colon = uri.find(':');
  if (colon == std::string::npos || colon == 0) {
    return Fail(Bad(uri, "expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH"));
  }
  std::string scheme = Lower(std::string_view(uri).substr(0, colon));
  NbdUri out;
  if (scheme == "nbds" || scheme == "nbds+unix") {
    return Fail(Error::NotSupported("bad NBD URI '" + Redacted(uri) + "': " + scheme +
                                    ":// requires TLS, and TLS not supported by this client; "
                                    "use nbd:// over a trusted network or a tunnel"));
  } else if (scheme == "nbd") {
    out.transport = NbdUri::Transport::kTcp;
  } else if (scheme == "nbd+unix") {
    out.transport = NbdUri::Transport::kUnix;
  } else {
    return Fail(Bad(uri, "unknown scheme '" + scheme + "' (expected nbd or nbd+unix)"));
  }
  std::string_view rest = std::string_view(uri).substr(colon + 1);
  if (!rest.starts_with("//")) return Fail(Bad(uri, "expected '//' after the scheme"));
  rest.remove_prefix(2);

  if (size_t hash = rest.find('#'); hash != std::string_view::npos) {
    return Fail(Bad(uri, "fragments ('#') are not allowed"));
  }
  std::string_view query;
  if (size_t q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view() : rest.substr(slash);

  // Authority: [userinfo@]host[:port]. A user name (the NBD URI form for a
  // TLS user) is ignored; a password is refused without echoing the URI,
  // since the URI is logged and shown in status output.
  if (size_t at = authority.rfind('@'); at != std::string_view::npos) {
    if (authority.substr(0, at).find(':') != std::string_view::npos) {
      return Fail(Error::Invalid(
          "bad NBD URI: it holds a password (user:password@), which would be written to logs "
          "and status output; NBD has no password authentication here, so remove it"));
    }
    authority.remove_prefix(at + 1);
  }
  if (out.transport == NbdUri::Transport::kUnix) {
    if (!authority.empty()) {
      return Fail(Bad(uri, "nbd+unix URIs take no host; use nbd+unix:///export?socket=PATH"));
    }
  } else {
    std::string_view host = authority;
    std::string_view port;
    if (authority.starts_with('[')) {
      size_t close = authority.find(']');
      if (close == std::string_view::npos) return Fail(Bad(uri, "unterminated '[' in IPv6 host"));
      host = authority.substr(1, close - 1);
      std::string_view after = authority.substr(close + 1);
      if (!after.empty()) {
        if (after[0] != ':') return Fail(Bad(uri, "unexpected text after IPv6 host"));
        port = after.substr(1);
      }
      if (host.empty() ||
          host.find_first_not_of("0123456789abcdefABCDEF:.") != std::string_view::npos) {
        return Fail(Bad(uri, "'" + std::string(host) + "' is not an IPv6 address"));
      }
      out.host = std::string(host);
    } else {
      if (size_t c = authority.find(':'); c != std::string_view::npos) {
        host = authority.substr(0, c);
        port = authority.substr(c + 1);
      }
      auto decoded = PercentDecode(host, false, uri, "host");
      if (!decoded) return Fail(decoded.error());
      out.host = *decoded;
      for (unsigned char c : out.host) {
        if (!(std::isalnum(c) || c == '-' || c == '.' || c == '_')) {
          return Fail(Bad(uri, "'" + out.host + "' is not a valid host name"));
        }
      }
    }
    if (out.host.empty()) return Fail(Bad(uri, "missing host; expected nbd://host[:port]/export"));
    if (!port.empty()) {
      unsigned value = 0;
      auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
      if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
        return Fail(Bad(uri, "port '" + std::string(port) + "' is not a number in 1..65535"));
      }
      out.port = uint16_t(value);
    }
  }

  if (!path.empty()) {
    auto name = PercentDecode(path.substr(1), false, uri, "export name");
    if (!name) return Fail(name.error());
    if (name->size() > nbd::kMaxNameLength) return Fail(Bad(uri, "export name is too long"));
    out.export_name = *name;
  }

  // Query: key=value pairs separated by '&'.
  bool have_socket = false;
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    std::string key = Lower(pair.substr(0, eq));
    std::string_view raw = eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    if (key == "socket") {
      if (out.transport != NbdUri::Transport::kUnix) {
        return Fail(Bad(uri, "'socket=' needs the nbd+unix scheme"));
      }
      // A leading NUL selects Linux's abstract socket namespace (uri.md).
      auto path_value = PercentDecode(raw, true, uri, "socket");
      if (!path_value) return Fail(path_value.error());
      if (path_value->empty()) return Fail(Bad(uri, "empty socket path"));
      if (path_value->find('\0', 1) != std::string::npos) {
        return Fail(Bad(uri, "socket path contains a NUL byte"));
      }
      out.socket_path = *path_value;
      have_socket = true;
    } else if (key.starts_with("tls")) {
      return Fail(Error::NotSupported("bad NBD URI '" + Redacted(uri) + "': parameter '" + key +
                                      "' asks for TLS, and TLS not supported by this client"));
    } else if (key.starts_with("x-")) {
      continue;  // experimental parameters of other clients
    } else {
      return Fail(Bad(uri, "unknown query parameter '" + key + "'"));
    }
  }
  if (out.transport == NbdUri::Transport::kUnix && !have_socket) {
    return Fail(Bad(uri, "nbd+unix URIs need ?socket=PATH"));
  }
  return out;
}

std::string NbdUri::ToString() const {
  std::string s;
  if (transport == Transport::kUnix) {
    s = "nbd+unix://";
  } else {
    s = "nbd://";
    if (host.find(':') != std::string::npos) {
      s += "[" + host + "]";
    } else {
      s += PercentEncode(host, "");
    }
    s += ":" + std::to_string(port);
  }
  s += "/";
  s += PercentEncode(export_name, "/:@!$&'()*+,;=");
  if (transport == Transport::kUnix) {
    s += "?socket=" + PercentEncode(socket_path, "/:@!$'()*,;");
  }
  return s;
}

}  // namespace kagemusha::storage
