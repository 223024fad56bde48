#include "posix_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace kagemusha::storage::posix {

Status PreadFull(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& what) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, off_t(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, "read " + what + " at " + std::to_string(offset + done)));
    }
    if (n == 0) {  // end of file: the rest reads as zeroes
      std::memset(buf.data() + done, 0, buf.size() - done);
      return Ok();
    }
    done += size_t(n);
  }
  return Ok();
}

Status PwriteFull(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& what) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pwrite(fd, buf.data() + done, buf.size() - done, off_t(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, "write " + what + " at " + std::to_string(offset + done)));
    }
    if (n == 0) return Fail(Error::Io("write " + what + ": no progress"));
    done += size_t(n);
  }
  return Ok();
}

Status DataSync(int fd, const std::string& what) {
  while (::fdatasync(fd) != 0) {
    if (errno == EINTR) continue;
    return Fail(Error::Errno(errno, "fdatasync " + what));
  }
  return Ok();
}

StickySync::StickySync(int fd, std::string what, SyncFn sync)
    : fd_(fd), what_(std::move(what)), sync_(std::move(sync)) {}

Status StickySync::Sync() {
  std::unique_lock lk(mu_);
  // Everything this caller wrote is done by now: a sync that starts after
  // this point covers it.
  const uint64_t me = ++requested_;
  for (;;) {
    if (failed_) return Fail(*failed_);
    if (covered_ >= me) return Ok();
    if (!syncing_) break;
    done_cv_.wait(lk);
  }
  syncing_ = true;
  const uint64_t covers = requested_;
  lk.unlock();
  Status s = sync_ ? sync_(fd_) : DataSync(fd_, what_);
  lk.lock();
  syncing_ = false;
  if (s) {
    covered_ = covers;
  } else {
    failed_ = Error(s.error().code(),
                    s.error().message() +
                        "; data written before it may not be on disk, so no later flush of " +
                        what_ + " is acknowledged. Check the device, then restart the server");
  }
  done_cv_.notify_all();
  if (failed_) return Fail(*failed_);
  return Ok();
}

bool StickySync::failed() const {
  std::lock_guard lk(mu_);
  return failed_.has_value();
}

Status SyncParentDir(const std::string& path) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "open directory " + dir));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Fail(Error::Errno(err, "fsync directory " + dir));
  return Ok();
}

}  // namespace kagemusha::storage::posix
