#include "host_daemon.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace kagemusha::tunnel {
namespace {

using nlohmann::json;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kagemusha-hostd-test.XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

json ValidArgs() {
  return {{"name", "vm1"},
          {"guest_mac", "52:54:00:00:00:10"},
          {"hoa", {"2001:db8:a::10", "2001:db8:a::11"}},
          {"hoa4", "192.0.2.10"},
          {"home_prefix", "2001:db8:a::/64"},
          {"router_mac", "02:00:00:00:00:01"},
          {"router_ll", "fe80::1"},
          {"router_global", "2001:db8:a::1"},
          {"router_v4", "192.0.2.1"},
          {"ha", "2001:db8:a::2"},
          {"coa", "2001:db8:b::2"},
          {"uplink", "eth0"},
          {"bridge", "br0"},
          {"mtu", 1400},
          {"lifetime", 120},
          {"ra", true},
          {"insecure", true}};
}

TEST(HostSessionSpec, ParsesCliArgumentsAndRoundTripsThroughJson) {
  auto spec = ParseHostSessionSpec(ValidArgs());
  ASSERT_TRUE(spec) << spec.error().message();
  const auto& c = spec->config;
  EXPECT_EQ(c.home_addresses.size(), 2u);
  EXPECT_EQ(c.home_prefix_length, 64);
  EXPECT_EQ(c.tunnel_mtu, 1400u);
  EXPECT_EQ(c.lifetime_seconds, 120u);
  EXPECT_TRUE(c.send_router_advertisements);
  EXPECT_FALSE(c.auth);
  EXPECT_EQ(FormatMac(c.guest_mac), "52:54:00:00:00:10");
  auto again = ParseHostSessionSpec(HostSessionSpecToJson(*spec));
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_EQ(HostSessionSpecToJson(*again), HostSessionSpecToJson(*spec));
}

TEST(HostSessionSpec, KeyFileHexTextDecodesElseRawBytesLikeTheHomeAgent) {
  auto bytes = [](std::string t) { return std::vector<uint8_t>(t.begin(), t.end()); };
  EXPECT_EQ(DecodeKeyFileBytes(bytes("0a1B\n")), (std::vector<uint8_t>{0x0a, 0x1b}));
  EXPECT_EQ(DecodeKeyFileBytes(bytes("0a1b\r\n")), (std::vector<uint8_t>{0x0a, 0x1b}));
  EXPECT_EQ(DecodeKeyFileBytes(bytes("0a1")), bytes("0a1")) << "odd length: raw";
  EXPECT_EQ(DecodeKeyFileBytes(bytes("0a1g")), bytes("0a1g"));
  EXPECT_EQ(DecodeKeyFileBytes(bytes("\xff\x01")), bytes("\xff\x01"));
}

TEST(HostSessionSpec, ReadsNonHexKeyFileAsRawBytes) {
  TempDir dir;
  const std::string key = dir.path() + "/key";
  std::ofstream(key) << "secret\n";
  auto args = ValidArgs();
  args.erase("insecure");
  args["key_file"] = key;
  args["spi"] = 7;
  auto spec = ParseHostSessionSpec(args);
  ASSERT_TRUE(spec) << spec.error().message();
  ASSERT_TRUE(spec->config.auth);
  EXPECT_EQ(spec->config.auth->spi, 7u);
  EXPECT_EQ(std::string(spec->config.auth->key.begin(), spec->config.auth->key.end()), "secret\n");
}

TEST(HostSessionSpec, RejectsBadOrMissingFields) {
  auto bad = [](const char* key, json value) {
    auto a = ValidArgs();
    if (value.is_null())
      a.erase(key);
    else
      a[key] = value;
    return ParseHostSessionSpec(a).has_value();
  };
  EXPECT_FALSE(bad("name", "../x"));
  EXPECT_FALSE(bad("guest_mac", "52:54:00:00:10"));
  EXPECT_FALSE(bad("hoa", nullptr));
  EXPECT_FALSE(bad("hoa", "fe80::10"));
  EXPECT_FALSE(bad("home_prefix", "2001:db8:a::"));
  EXPECT_FALSE(bad("router_ll", "2001:db8::1"));
  EXPECT_FALSE(bad("ha", "not-an-address"));
  EXPECT_FALSE(bad("bridge", nullptr));
  EXPECT_FALSE(bad("mtu", 1000));
  EXPECT_FALSE(bad("insecure", nullptr)) << "neither key nor insecure";
  auto both = ValidArgs();
  both["key_file"] = "/nonexistent";
  both["spi"] = 1;
  EXPECT_FALSE(ParseHostSessionSpec(both)) << "key and insecure together";
  auto missing_key = ValidArgs();
  missing_key.erase("insecure");
  missing_key["key_file"] = "/nonexistent/key";
  missing_key["spi"] = 1;
  EXPECT_FALSE(ParseHostSessionSpec(missing_key));
}

TEST(FileSequenceStore, PersistsAcrossInstancesWithMode0600) {
  TempDir dir;
  const std::string path = dir.path() + "/vm1.json";
  Ipv6Address hoa{};
  hoa[0] = 0x20;
  hoa[15] = 0x10;
  {
    FileSequenceStore store(path);
    EXPECT_FALSE(store.LastSent(hoa));
    ASSERT_TRUE(store.Record(hoa, 41));
    ASSERT_TRUE(store.Record(hoa, 42));
  }
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  FileSequenceStore reopened(path);
  ASSERT_TRUE(reopened.LastSent(hoa));
  EXPECT_EQ(*reopened.LastSent(hoa), 42);
}

TEST(FileSequenceStore, CorruptFileIsIgnoredNotFatal) {
  TempDir dir;
  const std::string path = dir.path() + "/vm1.json";
  std::ofstream(path) << "{not json";
  FileSequenceStore store(path);
  Ipv6Address hoa{};
  EXPECT_FALSE(store.LastSent(hoa));
  EXPECT_TRUE(store.Record(hoa, 1));
}

TEST(WriteFileDurably, ReplacesAtomicallyAndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir.path() + "/f";
  ASSERT_TRUE(WriteFileDurably(path, "one"));
  ASSERT_TRUE(WriteFileDurably(path, "two"));
  std::ifstream in(path);
  std::string s;
  in >> s;
  EXPECT_EQ(s, "two");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_FALSE(WriteFileDurably(dir.path() + "/missing/f", "x"));
}

}  // namespace
}  // namespace kagemusha::tunnel
