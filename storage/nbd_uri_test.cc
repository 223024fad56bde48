#include <gtest/gtest.h>

#include "kagemusha/storage/nbd_client.h"

namespace kagemusha::storage {
namespace {

using T = NbdUri::Transport;

TEST(NbdUri, ParsesValidUris) {
  struct Case {
    const char* uri;
    T transport;
    const char* host;
    uint16_t port;
    const char* socket;
    std::string export_name;
  } cases[] = {
      {"nbd://example.com", T::kTcp, "example.com", 10809, "", ""},
      {"nbd://example.com/", T::kTcp, "example.com", 10809, "", ""},
      {"nbd://example.com:/", T::kTcp, "example.com", 10809, "", ""},  // RFC 3986: empty port
      {"nbd://example.com:10810/disk", T::kTcp, "example.com", 10810, "", "disk"},
      {"nbd://192.0.2.7:1/disk", T::kTcp, "192.0.2.7", 1, "", "disk"},
      {"nbd://[2001:db8::1]:10809/e", T::kTcp, "2001:db8::1", 10809, "", "e"},
      {"nbd://[::1]/e", T::kTcp, "::1", 10809, "", "e"},
      {"nbd://example.com//disk", T::kTcp, "example.com", 10809, "", "/disk"},
      {"nbd://example.com/hello%20world", T::kTcp, "example.com", 10809, "", "hello world"},
      {"nbd://example.com/a%2fb%3F", T::kTcp, "example.com", 10809, "", "a/b?"},
      {"NBD://user@example.com/disk", T::kTcp, "example.com", 10809, "", "disk"},
      {"nbd+unix:///e?socket=/p", T::kUnix, "", 10809, "/p", "e"},
      {"nbd+unix:///?socket=/run/nbd%20x.sock", T::kUnix, "", 10809, "/run/nbd x.sock", ""},
      {"nbd+unix:///e?x-foo=1&socket=/p", T::kUnix, "", 10809, "/p", "e"},
      {"nbd+unix:///?socket=%00/abstract", T::kUnix, "", 10809, "", ""},
  };
  for (const auto& c : cases) {
    auto u = ParseNbdUri(c.uri);
    ASSERT_TRUE(u) << c.uri << ": " << u.error().message();
    EXPECT_EQ(u->transport, c.transport) << c.uri;
    EXPECT_EQ(u->host, c.host) << c.uri;
    EXPECT_EQ(u->port, c.port) << c.uri;
    if (std::string_view(c.uri).find("%00") == std::string_view::npos) {
      EXPECT_EQ(u->socket_path, c.socket) << c.uri;
    } else {
      EXPECT_EQ(u->socket_path, std::string("\0/abstract", 10)) << c.uri;
    }
    EXPECT_EQ(u->export_name, c.export_name) << c.uri;
  }
}

TEST(NbdUri, RejectsTlsSchemesWithClearMessage) {
  for (const char* uri : {"nbds://example.com/disk", "nbds+unix:///e?socket=/p",
                          "nbd://example.com/disk?tls-type=x509"}) {
    auto u = ParseNbdUri(uri);
    ASSERT_FALSE(u) << uri;
    EXPECT_EQ(u.error().code(), ENOTSUP) << uri;
    EXPECT_NE(u.error().message().find("TLS not supported"), std::string::npos)
        << u.error().message();
  }
}

TEST(NbdUri, RejectsGarbage) {
  struct Case {
    const char* uri;
    const char* text;
  } cases[] = {
      {"", "expected nbd://"},
      {"example.com:10809", "unknown scheme"},
      {"http://example.com/", "unknown scheme"},
      {"nbd:example.com", "expected '//'"},
      {"nbd://", "missing host"},
      {"nbd:///disk", "missing host"},
      {"nbd://example.com:0/", "port"},
      {"nbd://example.com:65536/", "port"},
      {"nbd://example.com:12ab/", "port"},
      {"nbd://[2001:db8::1/e", "unterminated"},
      {"nbd://[2001:db8::1]x/e", "unexpected text"},
      {"nbd://[zz]/e", "not an IPv6 address"},
      {"nbd://exa mple.com/", "spaces"},
      {"nbd://ex%41mple!.com/", "not a valid host"},
      {"nbd://example.com/a%2", "truncated percent-escape"},
      {"nbd://example.com/a%zz", "bad percent-escape"},
      {"nbd://example.com/a%00b", "NUL"},
      {"nbd://example.com/disk#frag", "fragments"},
      {"nbd://example.com/disk?socket=/p", "needs the nbd+unix scheme"},
      {"nbd://example.com/disk?bogus=1", "unknown query parameter 'bogus'"},
      {"nbd+unix:///e", "need ?socket="},
      {"nbd+unix:///e?socket=", "empty socket path"},
      {"nbd+unix://host/e?socket=/p", "take no host"},
  };
  for (const auto& c : cases) {
    auto u = ParseNbdUri(c.uri);
    ASSERT_FALSE(u) << "accepted '" << c.uri << "'";
    EXPECT_EQ(u.error().code(), EINVAL) << c.uri;
    EXPECT_NE(u.error().message().find(c.text), std::string::npos)
        << c.uri << " -> " << u.error().message();
  }
}

TEST(NbdUri, ToStringRoundTripsAndDropsUserinfo) {
  for (const char* uri : {"nbd://example.com:10809/disk", "nbd://[2001:db8::1]:10809/e",
                          "nbd://h:1//weird%20name%3F%23", "nbd+unix:///e?socket=/tmp/a%20b%26c",
                          "nbd+unix:///?socket=%00abstract"}) {
    auto u = ParseNbdUri(uri);
    ASSERT_TRUE(u) << uri;
    auto again = ParseNbdUri(u->ToString());
    ASSERT_TRUE(again) << u->ToString();
    EXPECT_EQ(again->transport, u->transport);
    EXPECT_EQ(again->host, u->host);
    EXPECT_EQ(again->port, u->port);
    EXPECT_EQ(again->socket_path, u->socket_path);
    EXPECT_EQ(again->export_name, u->export_name);
  }
  EXPECT_EQ(ParseNbdUri("nbd://example.com/disk")->ToString(), "nbd://example.com:10809/disk");
  EXPECT_EQ(ParseNbdUri("nbd://alice@example.com/x")->ToString(), "nbd://example.com:10809/x");
  // A password is refused, and the error does not repeat it.
  auto pw = ParseNbdUri("nbd://alice:secret@example.com/x");
  ASSERT_FALSE(pw);
  EXPECT_EQ(pw.error().code(), EINVAL);
  EXPECT_EQ(pw.error().message().find("secret"), std::string::npos) << pw.error().message();
  EXPECT_NE(pw.error().message().find("password"), std::string::npos) << pw.error().message();
  // Other errors print the URI, but never its user information.
  auto tls = ParseNbdUri("nbds://alice:secret@example.com/x");
  ASSERT_FALSE(tls);
  EXPECT_EQ(tls.error().message().find("secret"), std::string::npos) << tls.error().message();
  EXPECT_NE(tls.error().message().find("example.com"), std::string::npos) << tls.error().message();
  auto slash = ParseNbdUri("nbds://alice:se/cr?et@example.com/x");
  ASSERT_FALSE(slash);
  EXPECT_EQ(slash.error().message().find("cr?et"), std::string::npos) << slash.error().message();
  EXPECT_EQ(ParseNbdUri("nbd+unix:///e?socket=/p")->ToString(), "nbd+unix:///e?socket=/p");
}

}  // namespace
}  // namespace kagemusha::storage
