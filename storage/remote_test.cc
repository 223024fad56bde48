// RemoteReader's default ReadToFile (through a buffer), exercised through
// FakeRemote, which does not override it.
#include "kagemusha/storage/remote.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "fake_remote.h"
#include "test_util.h"

namespace kagemusha::storage {
namespace {

using testing::ReadFileBytes;
using testing::ScratchDir;
using testing::WriteFileBytes;

constexpr uint64_t kMiB = 1024 * 1024;

class RemoteReadToFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = FakeRemote::PatternImage(12 * kMiB, 7);
    remote_ = std::make_unique<FakeRemote>(image_);
    shared_ = remote_->shared();
  }
  // A file of `size` bytes all kFill, opened with `flags`.
  int MakeTarget(uint64_t size, int flags = O_RDWR) {
    path_ = dir_ / "target";
    WriteFileBytes(path_, std::vector<std::byte>(size, kFill));
    return ::open(path_.c_str(), flags | O_CLOEXEC);
  }
  // The target holds kFill outside [file_offset, +len), image_[offset, +len) inside.
  void ExpectTarget(uint64_t size, uint64_t file_offset, uint64_t offset, uint64_t len) {
    auto file = ReadFileBytes(path_);
    ASSERT_EQ(file.size(), size);
    for (uint64_t i = 0; i < file_offset; ++i) ASSERT_EQ(file[i], kFill) << "byte " << i;
    ASSERT_EQ(0, std::memcmp(file.data() + file_offset, image_.data() + offset, len));
    for (uint64_t i = file_offset + len; i < size; ++i) ASSERT_EQ(file[i], kFill) << "byte " << i;
  }
  std::vector<std::pair<uint64_t, uint64_t>> Log() {
    std::lock_guard lk(shared_->mu);
    return shared_->request_log;
  }

  static constexpr std::byte kFill{0xC3};
  ScratchDir dir_;
  std::string path_;
  std::vector<std::byte> image_;
  std::unique_ptr<FakeRemote> remote_;
  std::shared_ptr<FakeRemote::Shared> shared_;
};

TEST_F(RemoteReadToFileTest, DefaultReadToFileWritesTheRemoteBytesAtTheFileOffset) {
  const uint64_t size = 11 * kMiB, file_offset = 12345, offset = 777, len = 9 * kMiB + 3;
  int fd = MakeTarget(size);
  ASSERT_GE(fd, 0);
  auto s = remote_->ReadToFile(fd, file_offset, len, offset);
  ::close(fd);
  ASSERT_TRUE(s) << s.error().message();
  ExpectTarget(size, file_offset, offset, len);
  // Read in chunks of at most 4 MiB, in order, covering the range exactly.
  auto log = Log();
  ASSERT_EQ(log.size(), 3u);
  uint64_t at = offset;
  for (auto [o, n] : log) {
    EXPECT_EQ(o, at);
    EXPECT_LE(n, 4 * kMiB);
    at += n;
  }
  EXPECT_EQ(at, offset + len);
}

TEST_F(RemoteReadToFileTest, DefaultReadToFileOfZeroBytesIsOkAndAsksNothing) {
  int fd = MakeTarget(4096);
  ASSERT_GE(fd, 0);
  auto s = remote_->ReadToFile(fd, 0, 0, 100);
  ::close(fd);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_TRUE(Log().empty());
  ExpectTarget(4096, 0, 0, 0);
}

TEST_F(RemoteReadToFileTest, DefaultReadToFileReturnsTheRemoteFailureAndWritesNothing) {
  int fd = MakeTarget(kMiB);
  ASSERT_GE(fd, 0);
  FakeRemote::SetFailure(*shared_, FakeRemote::Failure::kIoError);
  ReadToFileFault fault = ReadToFileFault::kFile;
  auto io = remote_->ReadToFile(fd, 100, 65536, 0, &fault);
  ASSERT_FALSE(io);
  EXPECT_EQ(io.error().code(), EIO) << io.error().message();
  EXPECT_EQ(fault, ReadToFileFault::kRemote);
  FakeRemote::SetFailure(*shared_, FakeRemote::Failure::kDisconnected);
  auto gone = remote_->ReadToFile(fd, 100, 65536, 0);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().code(), ETIMEDOUT) << gone.error().message();
  FakeRemote::SetFailure(*shared_, FakeRemote::Failure::kNone);
  auto past = remote_->ReadToFile(fd, 0, 2, image_.size() - 1);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().code(), EINVAL) << past.error().message();
  ::close(fd);
  ExpectTarget(kMiB, 0, 0, 0);
}

TEST_F(RemoteReadToFileTest, DefaultReadToFileIntoAReadOnlyFdFailsWithTheWriteError) {
  int fd = MakeTarget(kMiB, O_RDONLY);
  ASSERT_GE(fd, 0);
  ReadToFileFault fault = ReadToFileFault::kRemote;
  auto s = remote_->ReadToFile(fd, 0, 65536, 4096, &fault);
  ::close(fd);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), EBADF) << s.error().message();
  EXPECT_EQ(fault, ReadToFileFault::kFile);
  EXPECT_NE(s.error().message().find("write fetched data at 0"), std::string::npos)
      << s.error().message();
  ExpectTarget(kMiB, 0, 0, 0);
}

}  // namespace
}  // namespace kagemusha::storage
