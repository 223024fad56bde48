#include "kagemusha/storage/file_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <latch>
#include <thread>
#include <cstring>

#include "posix_io.h"
#include "test_util.h"

namespace kagemusha::storage {
namespace {

using testing::ScratchDir;

constexpr uint64_t kMiB = 1024 * 1024;

std::vector<std::byte> Bytes(size_t n, uint8_t v) {
  return std::vector<std::byte>(n, std::byte(v));
}

std::unique_ptr<FileBackend> NewImage(const ScratchDir& dir, uint64_t size,
                                      std::function<Status(int)> sync = nullptr) {
  auto b = FileBackend::Open(dir / "img",
                             {.create = true, .create_size = size, .sync_for_test = std::move(sync)});
  EXPECT_TRUE(b.has_value()) << b.error().message();
  return std::move(*b);
}

TEST(FileBackend, CreatesSparseImageOfRequestedSize) {
  ScratchDir dir;
  auto b = NewImage(dir, 8 * kMiB);
  EXPECT_EQ(b->Size(), 8 * kMiB);
  EXPECT_FALSE(b->is_block_device());
  auto caps = b->Caps();
  EXPECT_TRUE(caps.can_multi_conn);
  EXPECT_FALSE(caps.read_only);
  std::vector<std::byte> buf(4096, std::byte{0xff});
  ASSERT_TRUE(b->Read(buf, 4 * kMiB));
  EXPECT_EQ(buf, Bytes(4096, 0));
}

// An image whose fdatasync (the test seam) fails once with EIO and succeeds
// after, as Linux reports a writeback error once; 4 KiB already written.
std::unique_ptr<FileBackend> ImageWithAFailingSync(const ScratchDir& dir, int& calls) {
  auto b = NewImage(dir, kMiB, [&calls](int) -> Status {
    return ++calls == 1 ? Fail(Error::Errno(EIO, "fdatasync img")) : Ok();
  });
  std::vector<std::byte> data(4096, std::byte{7});
  if (!b->Write(data, 0, false)) return nullptr;
  return b;
}

// Linux reports a writeback error to one fdatasync and marks the pages
// clean; the next fdatasync succeeds though the data is gone. A flush after
// a failed one must therefore fail too, and not ask the kernel again.
TEST(FileBackend, AFailedFlushFailsEveryLaterFlushThoughTheNextFdatasyncWouldSucceed) {
  ScratchDir dir;
  int calls = 0;
  auto b = ImageWithAFailingSync(dir, calls);
  ASSERT_TRUE(b);
  auto first = b->Flush();
  ASSERT_FALSE(first);
  EXPECT_EQ(first.error().code(), EIO);
  auto second = b->Flush();
  ASSERT_FALSE(second) << "a flush after a failed fdatasync was acknowledged";
  EXPECT_EQ(second.error().code(), EIO);
  EXPECT_NE(second.error().message().find("restart the server"), std::string::npos)
      << second.error().message();
  EXPECT_EQ(calls, 1);
}

// A FUA write syncs through the same sticky sync: if its sync takes the
// writeback error of earlier writes, the next flush must fail as well.
TEST(FileBackend, AFuaWriteWhoseSyncFailsMakesEveryLaterFlushFail) {
  ScratchDir dir;
  int calls = 0;
  auto b = ImageWithAFailingSync(dir, calls);
  ASSERT_TRUE(b);
  std::vector<std::byte> data(4096, std::byte{7});
  auto fua = b->Write(data, 8192, true);
  ASSERT_FALSE(fua) << "the FUA write's sync failed, yet it was acknowledged";
  EXPECT_EQ(fua.error().code(), EIO);
  EXPECT_FALSE(b->Flush()) << "a flush after a failed FUA sync was acknowledged";
  EXPECT_EQ(calls, 1);
}

// Flushes that arrive while an fdatasync runs share the next one, instead
// of each running its own whole-file sync in turn.
TEST(StickySync, CallersArrivingDuringASyncShareTheNextOne) {
  std::atomic<int> calls{0};
  posix::StickySync sync(-1, "test file", [&calls](int) -> Status {
    ++calls;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return Ok();
  });
  constexpr int kCallers = 8;
  std::latch start(kCallers);
  std::atomic<int> ok{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i)
    callers.emplace_back([&] {
      start.arrive_and_wait();
      if (sync.Sync()) ++ok;
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(ok.load(), kCallers);
  EXPECT_LE(calls.load(), 3) << "each flush ran its own fdatasync";
  EXPECT_GE(calls.load(), 1);
}

TEST(FileBackend, UnalignedWritesReadBack) {
  ScratchDir dir;
  auto b = NewImage(dir, 1 * kMiB);
  auto data = Bytes(10000, 0xab);
  ASSERT_TRUE(b->Write(data, 12345, false));
  ASSERT_TRUE(b->Write(Bytes(3, 0x11), 12345 + 9999, true));  // FUA path
  std::vector<std::byte> got(10002);
  ASSERT_TRUE(b->Read(got, 12345));
  EXPECT_EQ(std::vector<std::byte>(got.begin(), got.begin() + 9999), Bytes(9999, 0xab));
  EXPECT_EQ(std::vector<std::byte>(got.begin() + 9999, got.end()), Bytes(3, 0x11));
  EXPECT_TRUE(b->Flush());
}

TEST(FileBackend, OpeningMissingFileFailsWithEnoent) {
  ScratchDir dir;
  auto b = FileBackend::Open(dir / "nope");
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code(), ENOENT);
  EXPECT_NE(b.error().message().find("nope"), std::string::npos);
}

TEST(FileBackend, ReadOnlyRejectsWritesWithEperm) {
  ScratchDir dir;
  NewImage(dir, kMiB);
  auto b = FileBackend::Open(dir / "img", {.read_only = true});
  ASSERT_TRUE(b.has_value());
  EXPECT_TRUE((*b)->Caps().read_only);
  auto w = (*b)->Write(Bytes(512, 1), 0, false);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code(), EPERM);
  EXPECT_FALSE((*b)->Trim(0, 4096, false));
  EXPECT_FALSE((*b)->Zero(0, 4096, false, false, false));
}

TEST(FileBackend, ExtentsReportHolesAsHoleAndZeroAndDataAsData) {
  ScratchDir dir;
  auto b = NewImage(dir, 4 * kMiB);
  ASSERT_TRUE(b->Write(Bytes(64 * 1024, 7), 1 * kMiB, false));
  auto ext = b->Extents(0, 4 * kMiB);
  ASSERT_TRUE(ext.has_value());
  std::vector<Extent> want = {
      {1 * kMiB, true, true}, {64 * 1024, false, false}, {3 * kMiB - 64 * 1024, true, true}};
  EXPECT_EQ(*ext, want);
  // A query that starts inside the data run.
  auto mid = b->Extents(1 * kMiB + 4096, 8192);
  ASSERT_TRUE(mid.has_value());
  EXPECT_EQ(*mid, (std::vector<Extent>{{8192, false, false}}));
}

TEST(FileBackend, TrimPunchesAHoleThatReadsAsZeroes) {
  ScratchDir dir;
  auto b = NewImage(dir, 2 * kMiB);
  ASSERT_TRUE(b->Write(Bytes(2 * kMiB, 0x5a), 0, false));
  ASSERT_TRUE(b->Trim(512 * 1024, 256 * 1024, false));
  std::vector<std::byte> got(256 * 1024);
  ASSERT_TRUE(b->Read(got, 512 * 1024));
  EXPECT_EQ(got, Bytes(256 * 1024, 0));
  auto ext = b->Extents(0, 2 * kMiB);
  ASSERT_TRUE(ext.has_value());
  std::vector<Extent> want = {
      {512 * 1024, false, false}, {256 * 1024, true, true}, {2 * kMiB - 768 * 1024, false, false}};
  EXPECT_EQ(*ext, want);
}

TEST(FileBackend, ZeroWritesZeroesWithAndWithoutTrim) {
  ScratchDir dir;
  auto b = NewImage(dir, 1 * kMiB);
  ASSERT_TRUE(b->Write(Bytes(kMiB, 0x77), 0, false));
  ASSERT_TRUE(b->Zero(1000, 5000, /*may_trim=*/false, /*fast=*/false, /*fua=*/false));
  ASSERT_TRUE(b->Zero(64 * 1024, 128 * 1024, /*may_trim=*/true, /*fast=*/false, /*fua=*/true));
  std::vector<std::byte> all(kMiB);
  ASSERT_TRUE(b->Read(all, 0));
  for (size_t i = 0; i < all.size(); ++i) {
    bool zero = (i >= 1000 && i < 6000) || (i >= 64 * 1024 && i < 192 * 1024);
    ASSERT_EQ(all[i], std::byte(zero ? 0 : 0x77)) << "offset " << i;
  }
  // ext4 supports ZERO_RANGE, so a fast zero succeeds.
  EXPECT_TRUE(b->Zero(0, 4096, false, /*fast=*/true, false));
}

TEST(FileBackend, WriteErrorsKeepTheirErrno) {
  // /dev/full fails every write with ENOSPC: the positional write loop that
  // FileBackend uses must report ENOSPC, not a generic EIO.
  int fd = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
  if (fd < 0) GTEST_SKIP() << "/dev/full not available";
  auto data = Bytes(4096, 1);
  auto s = posix::PwriteFull(fd, data, 0, "/dev/full");
  ::close(fd);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ENOSPC);
}

TEST(FileBackend, ReadsPastEndOfShortFileAreZero) {
  // A cache image created shorter than its nominal size (or truncated)
  // reads as zeroes beyond its end instead of failing.
  ScratchDir dir;
  int fd = ::open((dir / "short").c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "abc", 3, 0), 3);
  std::vector<std::byte> buf(10, std::byte{0xee});
  ASSERT_TRUE(posix::PreadFull(fd, buf, 0, "short"));
  ::close(fd);
  EXPECT_EQ(buf[2], std::byte('c'));
  EXPECT_EQ(buf[3], std::byte{0});
  EXPECT_EQ(buf[9], std::byte{0});
}

TEST(FileBackend, ConcurrentWritersOnOneObjectDoNotInterfere) {
  ScratchDir dir;
  auto b = NewImage(dir, 4 * kMiB);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < 64; ++i)
        ASSERT_TRUE(
            b->Write(Bytes(4096, uint8_t(t + 1)), uint64_t(t) * kMiB + uint64_t(i) * 4096, false));
    });
  for (auto& t : ts) t.join();
  ASSERT_TRUE(b->Flush());
  for (int t = 0; t < 4; ++t) {
    std::vector<std::byte> got(64 * 4096);
    ASSERT_TRUE(b->Read(got, uint64_t(t) * kMiB));
    EXPECT_EQ(got, Bytes(64 * 4096, uint8_t(t + 1)));
  }
}

// Attaches a backing file to a free loop device for the test's lifetime.
class LoopDevice {
 public:
  explicit LoopDevice(const std::string& backing) {
    int ctl = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) return;
    int n = ::ioctl(ctl, LOOP_CTL_GET_FREE);
    ::close(ctl);
    if (n < 0) return;
    std::string dev = "/dev/loop" + std::to_string(n);
    int fd = ::open(dev.c_str(), O_RDWR | O_CLOEXEC);
    int bfd = ::open(backing.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0 && bfd >= 0 && ::ioctl(fd, LOOP_SET_FD, bfd) == 0) {
      fd_ = fd;
      path_ = dev;
    } else if (fd >= 0) {
      ::close(fd);
    }
    if (bfd >= 0) ::close(bfd);
  }
  ~LoopDevice() {
    if (fd_ >= 0) {
      ::ioctl(fd_, LOOP_CLR_FD, 0);
      ::close(fd_);
    }
  }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

TEST(FileBackend, ServesABlockDeviceSizedByIoctl) {
  ScratchDir dir;
  NewImage(dir, 4 * kMiB);
  LoopDevice loop(dir / "img");
  if (loop.path().empty()) GTEST_SKIP() << "no loop device available (needs root)";
  auto b = FileBackend::Open(loop.path());
  ASSERT_TRUE(b.has_value()) << b.error().message();
  EXPECT_TRUE((*b)->is_block_device());
  EXPECT_EQ((*b)->Size(), 4 * kMiB);
  auto data = Bytes(8192, 0x3c);
  ASSERT_TRUE((*b)->Write(data, kMiB + 512, /*fua=*/true));
  std::vector<std::byte> got(8192);
  ASSERT_TRUE((*b)->Read(got, kMiB + 512));
  EXPECT_EQ(got, data);
  ASSERT_TRUE((*b)->Zero(kMiB, 64 * 1024, /*may_trim=*/false, /*fast=*/false, false));
  ASSERT_TRUE((*b)->Read(got, kMiB + 512));
  EXPECT_EQ(got, Bytes(8192, 0));
  ASSERT_TRUE((*b)->Trim(0, 64 * 1024, false));  // advisory: must not fail
  ASSERT_TRUE((*b)->Flush());
  auto ext = (*b)->Extents(0, 4 * kMiB);  // a block device has no holes to report
  ASSERT_TRUE(ext.has_value());
  EXPECT_EQ(*ext, (std::vector<Extent>{{4 * kMiB, false, false}}));
}

}  // namespace
}  // namespace kagemusha::storage
