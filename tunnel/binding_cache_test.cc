#include "kagemusha/tunnel/binding_cache.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>

namespace kagemusha::tunnel {
namespace {

using namespace std::chrono_literals;

Ipv6Address Hoa(uint32_t i) {
  Ipv6Address a = *ParseIpv6("2001:db8:a::");
  a[12] = uint8_t(i >> 24);
  a[13] = uint8_t(i >> 16);
  a[14] = uint8_t(i >> 8);
  a[15] = uint8_t(i);
  return a;
}

CacheEntry Entry(uint32_t i, Clock::TimePoint expires) {
  CacheEntry e;
  e.home_address = Hoa(i);
  e.care_of = *ParseIpv6("2001:db8:b::10");
  e.sequence = uint16_t(i);
  e.expires = expires;
  return e;
}

TEST(SequenceNewer, ComparesModulo2To16) {
  EXPECT_TRUE(SequenceNewer(1, 0));
  EXPECT_FALSE(SequenceNewer(0, 0));
  EXPECT_FALSE(SequenceNewer(0, 1));
  EXPECT_TRUE(SequenceNewer(0, 65535));  // wrap-around
  EXPECT_TRUE(SequenceNewer(5, 65530));
  EXPECT_FALSE(SequenceNewer(65535, 0));
  EXPECT_TRUE(SequenceNewer(32767, 0));
  EXPECT_FALSE(SequenceNewer(32768, 0));  // half the space ahead counts as older
  EXPECT_FALSE(SequenceNewer(100, 200));
}

TEST(BindingCache, LooksUpReplacesAndRemovesByHomeAddress) {
  BindingCache c;
  Clock::TimePoint t0{};
  ASSERT_TRUE(c.Upsert(Entry(1, t0 + 10s)));
  ASSERT_NE(c.Find(Hoa(1)), nullptr);
  EXPECT_EQ(c.Find(Hoa(2)), nullptr);
  CacheEntry e = Entry(1, t0 + 100s);
  e.sequence = 7;
  ASSERT_TRUE(c.Upsert(e));
  EXPECT_EQ(c.size(), 1u);
  EXPECT_EQ(c.Find(Hoa(1))->sequence, 7);
  // The old expiry must be gone from the index: nothing expires at 10 s.
  EXPECT_TRUE(c.Expire(t0 + 50s).empty());
  EXPECT_EQ(*c.NextExpiry(), t0 + 100s);
  EXPECT_TRUE(c.Remove(Hoa(1)));
  EXPECT_FALSE(c.Remove(Hoa(1)));
  EXPECT_FALSE(c.NextExpiry().has_value());
}

TEST(BindingCache, ExpiresInOrderAndOnlyWhatIsDue) {
  BindingCache c;
  Clock::TimePoint t0{};
  ASSERT_TRUE(c.Upsert(Entry(3, t0 + 30s)));
  ASSERT_TRUE(c.Upsert(Entry(1, t0 + 10s)));
  ASSERT_TRUE(c.Upsert(Entry(2, t0 + 20s)));
  auto gone = c.Expire(t0 + 20s);
  ASSERT_EQ(gone.size(), 2u);
  EXPECT_EQ(gone[0].home_address, Hoa(1));
  EXPECT_EQ(gone[1].home_address, Hoa(2));
  EXPECT_EQ(c.size(), 1u);
  EXPECT_NE(c.Find(Hoa(3)), nullptr);
}

TEST(BindingCache, IndexesIpv4HomeAddressesAndRefusesSharingOne) {
  BindingCache c;
  CacheEntry a = Entry(1, Clock::TimePoint{} + 10s);
  a.home_address4 = *ParseIpv4("192.0.2.20");
  ASSERT_TRUE(c.Upsert(a));
  ASSERT_NE(c.FindByHomeAddress4(*ParseIpv4("192.0.2.20")), nullptr);
  EXPECT_EQ(c.FindByHomeAddress4(*ParseIpv4("192.0.2.20"))->home_address, Hoa(1));
  CacheEntry b = Entry(2, Clock::TimePoint{} + 10s);
  b.home_address4 = a.home_address4;
  auto s = c.Upsert(b);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), EADDRINUSE);
  a.home_address4.reset();  // a refresh without the IPv4 address drops it
  ASSERT_TRUE(c.Upsert(a));
  EXPECT_EQ(c.FindByHomeAddress4(*ParseIpv4("192.0.2.20")), nullptr);
  EXPECT_TRUE(c.Upsert(b));
}

TEST(BindingCache, RefusesBindingsBeyondItsCapacity) {
  BindingCache c(2);
  ASSERT_TRUE(c.Upsert(Entry(1, {})));
  ASSERT_TRUE(c.Upsert(Entry(2, {})));
  auto s = c.Upsert(Entry(3, {}));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ENOSPC);
  EXPECT_TRUE(c.Upsert(Entry(2, {})));  // replacing still works
}

TEST(BindingCache, HoldsTenThousandBindingsAndExpiresThemAll) {
  BindingCache c;
  Clock::TimePoint t0{};
  for (uint32_t i = 0; i < 10000; ++i) {
    ASSERT_TRUE(c.Upsert(Entry(i, t0 + std::chrono::seconds(1 + i % 100))));
  }
  EXPECT_EQ(c.size(), 10000u);
  for (uint32_t i = 0; i < 10000; ++i) {
    const CacheEntry* e = c.Find(Hoa(i));
    ASSERT_NE(e, nullptr);
    ASSERT_EQ(e->sequence, uint16_t(i));
  }
  EXPECT_EQ(c.Find(Hoa(10000)), nullptr);
  size_t expired = 0;
  for (int s = 1; s <= 100; ++s) {
    auto gone = c.Expire(t0 + std::chrono::seconds(s));
    ASSERT_EQ(gone.size(), 100u) << "second " << s;
    expired += gone.size();
  }
  EXPECT_EQ(expired, 10000u);
  EXPECT_EQ(c.size(), 0u);
}

// ---- Journal ---------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kagemusha-ha-test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

PersistedBinding Persisted(uint32_t i) {
  PersistedBinding p;
  p.home_address = Hoa(i);
  p.care_of = *ParseIpv6("2001:db8:b::10");
  p.sequence = uint16_t(i * 3);
  p.flags = 0xc000;
  p.granted_seconds = 600;
  p.expires_unix_ms = 1'800'000'000'000 + i;
  p.spi = 1000 + i;
  return p;
}

TEST(BindingJournal, RecordLineRoundTrips) {
  PersistedBinding p = Persisted(5);
  p.home_address4 = *ParseIpv4("192.0.2.20");
  auto back = ParseJournalUpsert(FormatJournalUpsert(p));
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(*back, p);
  EXPECT_FALSE(ParseJournalUpsert("B 2001:db8::1 2001:db8::2 70000 0 0 0 - 0"));
  EXPECT_FALSE(ParseJournalUpsert("B nonsense"));
}

TEST(BindingJournal, ReplaysUpsertsAndRemovalsAcrossReopen) {
  TempDir dir;
  {
    auto j = BindingJournal::Open(dir.path() + "/state");
    ASSERT_TRUE(j) << j.error().message();
    ASSERT_TRUE((*j)->AppendUpsert(Persisted(1)));
    ASSERT_TRUE((*j)->AppendUpsert(Persisted(2)));
    PersistedBinding moved = Persisted(1);
    moved.care_of = *ParseIpv6("2001:db8:c::10");
    ASSERT_TRUE((*j)->AppendUpsert(moved));
    ASSERT_TRUE((*j)->AppendRemove(Hoa(2)));
  }
  struct stat st {};
  ASSERT_EQ(::stat((dir.path() + "/state/bindings.journal").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat((dir.path() + "/state").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  auto j = BindingJournal::Open(dir.path() + "/state");
  ASSERT_TRUE(j);
  auto loaded = (*j)->Load();
  ASSERT_TRUE(loaded) << loaded.error().message();
  ASSERT_EQ(loaded->bindings.size(), 1u);
  EXPECT_EQ(loaded->bindings[0].care_of, *ParseIpv6("2001:db8:c::10"));
  EXPECT_EQ(loaded->records, 4u);
  EXPECT_EQ(loaded->bad_lines, 0u);
}

TEST(BindingJournal, SkipsATornLastLine) {
  TempDir dir;
  auto j = BindingJournal::Open(dir.path());
  ASSERT_TRUE(j);
  ASSERT_TRUE((*j)->AppendUpsert(Persisted(1)));
  {
    std::ofstream f((*j)->path(), std::ios::app);
    f << "B 2001:db8:a::2 2001:db8:b::10 1 0";  // crash mid-write: no newline
  }
  auto loaded = (*j)->Load();
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->bindings.size(), 1u);
  EXPECT_EQ(loaded->bad_lines, 1u);
}

TEST(BindingJournal, CompactionKeepsExactlyTheLiveSet) {
  TempDir dir;
  auto j = BindingJournal::Open(dir.path());
  ASSERT_TRUE(j);
  for (uint32_t i = 0; i < 50; ++i) ASSERT_TRUE((*j)->AppendUpsert(Persisted(i)));
  ASSERT_TRUE((*j)->Compact({Persisted(7), Persisted(9)}));
  EXPECT_EQ((*j)->appended_since_compaction(), 0u);
  ASSERT_TRUE((*j)->AppendRemove(Hoa(9)));
  auto loaded = (*j)->Load();
  ASSERT_TRUE(loaded);
  ASSERT_EQ(loaded->bindings.size(), 1u);
  EXPECT_EQ(loaded->bindings[0], Persisted(7));
  struct stat st {};
  ASSERT_EQ(::stat((*j)->path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(BindingJournal, RefusesAJournalReadableByOthers) {
  TempDir dir;
  { ASSERT_TRUE(BindingJournal::Open(dir.path())); }
  ::chmod((dir.path() + "/bindings.journal").c_str(), 0644);
  auto j = BindingJournal::Open(dir.path());
  ASSERT_FALSE(j);
  EXPECT_EQ(j.error().code(), EPERM);
}

TEST(BindingJournal, RefusesAFileThatIsNotAJournal) {
  TempDir dir;
  {
    std::ofstream f(dir.path() + "/bindings.journal");
    f << "something else\n";
  }
  ::chmod((dir.path() + "/bindings.journal").c_str(), 0600);
  auto j = BindingJournal::Open(dir.path());
  ASSERT_TRUE(j);
  EXPECT_FALSE((*j)->Load());
}

}  // namespace
}  // namespace kagemusha::tunnel
