#include "nbd_commands.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

namespace kagemusha::nbdcli {
namespace {

using json = nlohmann::json;
using storage::FillStatus;

// --- option values --------------------------------------------------------------

TEST(NbdCliByteCount, AcceptsPlainAndBinarySuffixes) {
  EXPECT_EQ(ParseByteCount("0", "x").value(), 0u);
  EXPECT_EQ(ParseByteCount("4096", "x").value(), 4096u);
  EXPECT_EQ(ParseByteCount("64K", "x").value(), 64u << 10);
  EXPECT_EQ(ParseByteCount("64k", "x").value(), 64u << 10);
  EXPECT_EQ(ParseByteCount("16M", "x").value(), 16u << 20);
  EXPECT_EQ(ParseByteCount("2G", "x").value(), 2ull << 30);
}

TEST(NbdCliByteCount, RejectsJunkNegativesAndOverflow) {
  for (const char* bad : {"", "K", "-1", "1.5M", "10MB", "10 M", "12T", "0x10",
                          "99999999999999999999", "17179869184G"}) {
    auto r = ParseByteCount(bad, "fill-rate");
    EXPECT_FALSE(r.has_value()) << bad;
    if (!r) {
      EXPECT_NE(r.error().message().find("fill-rate"), std::string::npos) << bad;
    }
  }
}

TEST(NbdCliRate, ZeroMeansUnlimitedAndSuffixesAreBinary) {
  EXPECT_EQ(ParseRate("0").value(), 0u);
  EXPECT_EQ(ParseRate("50M").value(), 50ull << 20);
  EXPECT_FALSE(ParseRate("fast").has_value());
}

TEST(NbdCliExportSpec, ParsesNamePathReadOnlyAndDescriptionWithCommas) {
  auto s = ParseExportSpec("disk=/images/a.img,ro,desc=boot disk, ssd");
  ASSERT_TRUE(s.has_value()) << s.error().message();
  EXPECT_EQ(s->name, "disk");
  EXPECT_EQ(s->path, "/images/a.img");
  EXPECT_TRUE(s->read_only);
  EXPECT_EQ(s->description, "boot disk, ssd");
  auto plain = ParseExportSpec("=/images/b.img");  // "" is NBD's default export
  ASSERT_TRUE(plain.has_value());
  EXPECT_EQ(plain->name, "");
  EXPECT_FALSE(plain->read_only);
}

TEST(NbdCliExportSpec, RejectsMissingPathAndUnknownOptions) {
  EXPECT_FALSE(ParseExportSpec("disk").has_value());
  EXPECT_FALSE(ParseExportSpec("disk=").has_value());
  auto r = ParseExportSpec("disk=/a.img,rw");
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message().find("'rw'"), std::string::npos);
}

TEST(NbdCliProxySpec, ParsesEveryOption) {
  auto s = ParseProxySpec(
      "vm=nbd://src.example:10810/disk0,cache=/c.img,bitmap=/"
      "c.bm,block-size=128K,fill-rate=16M,no-fill,"
      "auto-switch,desc=from site A, rack 3");
  ASSERT_TRUE(s.has_value()) << s.error().message();
  EXPECT_EQ(s->name, "vm");
  EXPECT_EQ(s->uri.host, "src.example");
  EXPECT_EQ(s->uri.port, 10810);
  EXPECT_EQ(s->uri.export_name, "disk0");
  EXPECT_EQ(s->cache_path, "/c.img");
  EXPECT_EQ(s->bitmap_path, "/c.bm");
  EXPECT_EQ(s->block_size, 128u << 10);
  EXPECT_EQ(s->fill_rate, 16u << 20);
  EXPECT_FALSE(s->fill);
  EXPECT_TRUE(s->auto_switch);
  EXPECT_EQ(s->description, "from site A, rack 3");
}

TEST(NbdCliProxySpec, DefaultsAndUnixUri) {
  auto s = ParseProxySpec("vm=nbd+unix:///disk?socket=/run/src.sock,cache=/c.img,bitmap=/c.bm");
  ASSERT_TRUE(s.has_value()) << s.error().message();
  EXPECT_EQ(s->uri.transport, storage::NbdUri::Transport::kUnix);
  EXPECT_EQ(s->uri.socket_path, "/run/src.sock");
  EXPECT_EQ(s->block_size, 64u << 10);
  EXPECT_EQ(s->fill_rate, 0u);
  EXPECT_TRUE(s->fill);
  EXPECT_FALSE(s->auto_switch);
}

TEST(NbdCliProxySpec, RejectsBadInputWithAMessageNamingTheProblem) {
  struct Case {
    const char* spec;
    const char* says;
  } cases[] = {
      {"vm=nbd://h/e,bitmap=/b", "cache=PATH"},
      {"vm=nbd://h/e,cache=/c", "bitmap=PATH"},
      {"vm=nbd://h/e,cache=/c,bitmap=/c", "different"},
      {"vm=http://h/e,cache=/c,bitmap=/b", "nbd://"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,block-size=3000", "power of two"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,block-size=2K", "power of two"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,block-size=2G", "power of two"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,fill-rate=lots", "byte count"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,no-fill=1", "unknown option"},
      {"vm=nbd://h/e,cache=,bitmap=/b", "needs a value"},
      {"vm=nbd://h/e,cache=/c,bitmap=/b,turbo", "unknown option"},
  };
  for (const auto& c : cases) {
    auto r = ParseProxySpec(c.spec);
    ASSERT_FALSE(r.has_value()) << c.spec;
    EXPECT_NE(r.error().message().find(c.says), std::string::npos)
        << c.spec << ": " << r.error().message();
  }
}

TEST(NbdCliListen, RequiresAnExplicitHostSoWildcardsAreNeverImplicit) {
  for (const char* ok :
       {"127.0.0.1:10809", "0.0.0.0:10809", "[::1]:0", "[::]:10809", "localhost:65535"}) {
    EXPECT_TRUE(CheckListenAddress(ok).has_value()) << ok;
  }
  for (const char* bad : {"10809", ":10809", "[::1]", "[::1]10809", "::1:10809",
                          "host:", "host:65536", "host:port", "[]:1"}) {
    EXPECT_FALSE(CheckListenAddress(bad).has_value()) << bad;
  }
}

// --- control commands over a fake proxy -------------------------------------------

// A CopyOnReadBackend whose fill state the test sets by hand.
class FakeProxy final : public storage::CopyOnReadBackend {
 public:
  explicit FakeProxy(uint64_t blocks) {
    st_.mode = "proxy";
    st_.fill_running = true;
    st_.remote_connected = true;
    st_.blocks_total = blocks;
    st_.block_size = 65536;
  }
  void SetPresent(uint64_t n) {
    std::lock_guard lk(mu_);
    st_.blocks_present = n;
    st_.complete = n == st_.blocks_total;
  }
  uint64_t Size() const override { return st_.blocks_total * st_.block_size; }
  storage::BackendCaps Caps() const override { return {}; }
  std::string Describe() const override { return "fake proxy"; }
  kagemusha::Status Read(std::span<std::byte>, uint64_t) override { return Ok(); }
  kagemusha::Status Write(std::span<const std::byte>, uint64_t, bool) override { return Ok(); }
  kagemusha::Status Flush() override { return Ok(); }
  kagemusha::Status Trim(uint64_t, uint64_t, bool) override { return Ok(); }
  kagemusha::Status Zero(uint64_t, uint64_t, bool, bool, bool) override { return Ok(); }
  kagemusha::Status Cache(uint64_t, uint64_t) override { return Ok(); }
  Result<std::vector<storage::Extent>> Extents(uint64_t, uint64_t length) override {
    return std::vector<storage::Extent>{{length, false, false}};
  }
  void StartFill() override {
    std::lock_guard lk(mu_);
    st_.fill_running = !st_.complete;
  }
  void StopFill() override {
    std::lock_guard lk(mu_);
    st_.fill_running = false;
  }
  void SetFillRate(uint64_t r) override {
    std::lock_guard lk(mu_);
    st_.rate_limit = r;
  }
  FillStatus Status() const override {
    std::lock_guard lk(mu_);
    return st_;
  }
  kagemusha::Status SwitchToTarget() override {
    std::lock_guard lk(mu_);
    if (!st_.complete) return Fail(Error(EAGAIN, "blocks missing"));
    st_.mode = "target";
    return Ok();
  }
  kagemusha::Status ReconnectRemote() override {
    reconnects++;
    return Ok();
  }
  std::atomic<int> reconnects{0};

 private:
  mutable std::mutex mu_;
  FillStatus st_;
};

class NbdControlCommandsTest : public ::testing::Test {
 protected:
  void AddProxy(const std::string& name, uint64_t blocks) {
    auto p = std::make_shared<FakeProxy>(blocks);
    ServedExport e;
    e.name = name;
    e.source = "nbd://src/" + name;
    e.proxy = p;
    e.backend = p;
    state_.exports.push_back(e);
    fakes_[name] = p;
  }
  void AddTarget(const std::string& name) {
    ServedExport e;
    e.name = name;
    e.source = "/images/" + name;
    e.backend = std::make_shared<FakeProxy>(4);  // any backend; no proxy => target
    state_.exports.push_back(e);
  }
  ControlResult Run(const std::string& command, const json& args = json::object()) {
    if (table_.empty()) table_ = NbdControlCommands(state_);
    for (auto& c : table_) {
      if (c.name == command) return c.handler(args);
    }
    ADD_FAILURE() << "no command " << command;
    return std::unexpected(ControlFailure(Error::Invalid("no such command")));
  }

  ServeState state_;
  std::map<std::string, std::shared_ptr<FakeProxy>> fakes_;
  std::vector<ControlCommand> table_;
};

TEST_F(NbdControlCommandsTest, TableHasTheDocumentedCommands) {
  AddProxy("vm", 8);
  std::vector<std::string> names;
  for (const auto& c : NbdControlCommands(state_)) {
    names.push_back(c.name);
    EXPECT_FALSE(c.description.empty()) << c.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"status", "fill-start", "fill-stop", "fill-rate",
                                             "switch", "reconnect"}));
}

TEST_F(NbdControlCommandsTest, StatusReportsProxyFieldsAndTargetMode) {
  AddProxy("vm", 8);
  AddTarget("disk");
  fakes_["vm"]->SetPresent(3);
  auto r = Run("status");
  ASSERT_TRUE(r.has_value());
  const json& exports = (*r)["exports"];
  ASSERT_EQ(exports.size(), 2u);
  EXPECT_EQ(exports[0]["name"], "vm");
  EXPECT_EQ(exports[0]["mode"], "proxy");
  EXPECT_EQ(exports[0]["blocks_present"], 3);
  EXPECT_EQ(exports[0]["blocks_total"], 8);
  EXPECT_EQ(exports[0]["complete"], false);
  EXPECT_EQ(exports[0]["remote_connected"], true);
  EXPECT_EQ(exports[1]["mode"], "target");
  EXPECT_FALSE(exports[1].contains("blocks_total"));
  auto one = Run("status", {{"export", "disk"}});
  ASSERT_TRUE(one.has_value());
  ASSERT_EQ((*one)["exports"].size(), 1u);
  EXPECT_EQ((*one)["exports"][0]["name"], "disk");
}

TEST_F(NbdControlCommandsTest, ExportMayBeOmittedOnlyWithASingleProxy) {
  AddProxy("vm", 8);
  AddTarget("disk");
  ASSERT_TRUE(Run("fill-stop").has_value());
  EXPECT_FALSE(fakes_["vm"]->Status().fill_running);
  AddProxy("vm2", 8);
  auto r = Run("fill-stop");
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().hint.find("--export"), std::string::npos);
  EXPECT_NE(r.error().hint.find("vm2"), std::string::npos);
  EXPECT_TRUE(Run("fill-stop", {{"export", "vm2"}}).has_value());
}

TEST_F(NbdControlCommandsTest, ProxyCommandsRefuseTargetAndUnknownExports) {
  AddProxy("vm", 8);
  AddTarget("disk");
  auto t = Run("switch", {{"export", "disk"}});
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.error().error.code(), EINVAL);
  auto u = Run("switch", {{"export", "nope"}});
  ASSERT_FALSE(u.has_value());
  EXPECT_EQ(u.error().error.code(), ENOENT);
  EXPECT_NE(u.error().hint.find("vm"), std::string::npos);
}

TEST_F(NbdControlCommandsTest, FillRateNeedsANonNegativeInteger) {
  AddProxy("vm", 8);
  EXPECT_FALSE(Run("fill-rate").has_value());
  EXPECT_FALSE(Run("fill-rate", {{"rate", -5}}).has_value());
  EXPECT_FALSE(Run("fill-rate", {{"rate", "16M"}}).has_value());
  auto ok = Run("fill-rate", {{"rate", 1 << 20}});
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ((*ok)["rate_limit"], 1 << 20);
  EXPECT_EQ(fakes_["vm"]->Status().rate_limit, 1u << 20);
}

TEST_F(NbdControlCommandsTest, SwitchBeforeCompletionSaysHowFarAndWhatToDo) {
  AddProxy("vm", 100);
  fakes_["vm"]->SetPresent(63);
  auto r = Run("switch");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().error.code(), EAGAIN);
  EXPECT_NE(r.error().error.message().find("63% complete"), std::string::npos)
      << r.error().error.message();
  EXPECT_NE(r.error().hint.find("switch --wait"), std::string::npos);
  fakes_["vm"]->SetPresent(100);
  auto ok = Run("switch");
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ((*ok)["mode"], "target");
}

TEST(NbdSwitchNotReady, NeverRounds99Point9PercentUpTo100AndMentionsAStoppedFill) {
  FillStatus st;
  st.blocks_total = 1000;
  st.blocks_present = 999;
  st.fill_running = false;
  auto f = SwitchNotReady(st, Error(EAGAIN, "x"));
  EXPECT_NE(f.error.message().find("99%"), std::string::npos) << f.error.message();
  EXPECT_NE(f.hint.find("fill is stopped"), std::string::npos);
  auto other = SwitchNotReady(st, Error::Io("disk on fire"));
  EXPECT_EQ(other.error.message(), "disk on fire");
  EXPECT_TRUE(other.hint.empty());
}

TEST_F(NbdControlCommandsTest, ReconnectReachesTheBackend) {
  AddProxy("vm", 8);
  ASSERT_TRUE(Run("reconnect").has_value());
  EXPECT_EQ(fakes_["vm"]->reconnects.load(), 1);
}

TEST(NbdStatusHuman, ShowsBlocksPercentRemoteAndConnections) {
  json status = {{"exports",
                  {{{"name", "vm"},
                    {"mode", "proxy"},
                    {"size", 64 << 20},
                    {"read_only", false},
                    {"source", "nbd://a/b"},
                    {"blocks_total", 1024},
                    {"blocks_present", 512},
                    {"block_size", 65536},
                    {"remote_connected", false},
                    {"bytes_fetched", 32 << 20},
                    {"bytes_fetched_fill", 30 << 20},
                    {"blocks_committed", 500},
                    {"rate", 1048576.0},
                    {"eta_seconds", 32.0},
                    {"rate_limit", 0},
                    {"fill_running", true},
                    {"complete", false},
                    {"cache", "/c"},
                    {"bitmap", "/b"},
                    {"last_error", "connection reset"}}}},
                 {"server",
                  {{"connections_open", 2},
                   {"connections_total", 5},
                   {"requests", 10},
                   {"requests_inline", 7},
                   {"bytes_read", 0},
                   {"bytes_written", 0}}}};
  std::string text = FormatStatusHuman(status);
  EXPECT_NE(text.find("512/1024 present (50.0%)"), std::string::npos) << text;
  EXPECT_NE(text.find(", 500 committed"), std::string::npos) << text;
  EXPECT_NE(text.find("disconnected"), std::string::npos) << text;
  EXPECT_NE(text.find("ETA 32s"), std::string::npos) << text;
  EXPECT_NE(text.find("limit unlimited"), std::string::npos) << text;
  EXPECT_NE(text.find("last error: connection reset"), std::string::npos) << text;
  EXPECT_NE(text.find("2 connections open"), std::string::npos) << text;
  EXPECT_NE(text.find("10 requests (7 inline)"), std::string::npos) << text;
}

TEST(NbdSubcommandTable, ListsEveryDocumentedSubcommandInTheUsage) {
  std::string usage = TopLevelUsage();
  for (const char* name : {"serve", "status", "fill", "switch", "reconnect"}) {
    bool found = false;
    for (const auto& c : NbdSubcommands()) found |= std::string(c.name) == name;
    EXPECT_TRUE(found) << name;
    EXPECT_NE(usage.find(name), std::string::npos) << name;
  }
}

}  // namespace
}  // namespace kagemusha::nbdcli
