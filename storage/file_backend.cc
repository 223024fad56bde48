#include "kagemusha/storage/file_backend.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "posix_io.h"

namespace kagemusha::storage {
namespace {

bool FallocateUnsupported(int err) { return err == EOPNOTSUPP || err == ENOSYS || err == EINVAL; }

// fallocate that retries EINTR; returns 0 or errno.
int Fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
  while (::fallocate(fd, mode, off_t(offset), off_t(length)) != 0) {
    if (errno == EINTR) continue;
    return errno;
  }
  return 0;
}

}  // namespace

Result<std::unique_ptr<FileBackend>> FileBackend::Open(const std::string& path,
                                                       const FileBackendOptions& options) {
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (options.create && !options.read_only) flags |= O_CREAT;
  int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) return Fail(Error::Errno(errno, "open " + path));
  auto fail = [&](Error e) {
    ::close(fd);
    return Fail(std::move(e));
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail(Error::Errno(errno, "stat " + path));
  uint64_t size = 0;
  bool block_device = S_ISBLK(st.st_mode);
  if (block_device) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0)
      return fail(Error::Errno(errno, "BLKGETSIZE64 " + path));
  } else if (S_ISREG(st.st_mode)) {
    size = uint64_t(st.st_size);
    if (options.create && size == 0 && options.create_size > 0) {
      if (::ftruncate(fd, off_t(options.create_size)) != 0)
        return fail(Error::Errno(errno, "size new image " + path));
      size = options.create_size;
      if (auto s = posix::SyncParentDir(path); !s) return fail(s.error());
    }
  } else {
    return fail(Error::Invalid(path + " is neither a regular file nor a block device"));
  }
  return std::unique_ptr<FileBackend>(
      new FileBackend(path, fd, size, options.read_only, block_device, options.sync_for_test));
}

FileBackend::FileBackend(std::string path, int fd, uint64_t size, bool read_only, bool block_device,
                         std::function<Status(int fd)> sync_for_test)
    : path_(std::move(path)),
      fd_(fd),
      size_(size),
      read_only_(read_only),
      block_device_(block_device),
      sync_(std::make_unique<posix::StickySync>(fd, path_, std::move(sync_for_test))) {}

FileBackend::~FileBackend() { ::close(fd_); }

BackendCaps FileBackend::Caps() const {
  BackendCaps c;
  c.read_only = read_only_;
  c.can_flush = true;
  c.can_fua = !read_only_;
  c.can_trim = !read_only_;
  c.can_zero = !read_only_;
  c.can_fast_zero = !read_only_;  // fast zero fails ENOTSUP when fallocate cannot do it
  c.can_cache = true;
  c.can_extents = true;
  c.can_multi_conn = true;  // one fd shared by all connections; fdatasync covers all writes
  c.rotational = false;
  return c;
}

std::string FileBackend::Describe() const {
  return std::string(block_device_ ? "block device " : "image file ") + path_ +
         (read_only_ ? " (read-only)" : "");
}

Status FileBackend::Read(std::span<std::byte> buf, uint64_t offset) {
  return posix::PreadFull(fd_, buf, offset, path_);
}

Status FileBackend::Write(std::span<const std::byte> buf, uint64_t offset, bool fua) {
  if (read_only_) return Fail(Error::Permission(path_ + " is read-only"));
  if (auto s = posix::PwriteFull(fd_, buf, offset, path_); !s) return s;
  // FUA as write + fdatasync through the sticky sync, not RWF_DSYNC: a
  // writeback error of earlier writes that a dsync write consumed would
  // otherwise fail only that request, and the next Flush succeed.
  return fua ? sync_->Sync() : Ok();
}

Status FileBackend::Flush() { return sync_->Sync(); }

Status FileBackend::Trim(uint64_t offset, uint64_t length, bool fua) {
  if (read_only_) return Fail(Error::Permission(path_ + " is read-only"));
  if (length == 0) return Ok();
  int err = Fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  // Trim is advisory: a file system that cannot punch holes simply keeps the data.
  if (err != 0 && !FallocateUnsupported(err))
    return Fail(Error::Errno(err, "trim " + path_ + " at " + std::to_string(offset)));
  return fua ? Flush() : Ok();
}

Status FileBackend::Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool fua) {
  if (read_only_) return Fail(Error::Permission(path_ + " is read-only"));
  if (length == 0) return Ok();
  auto done = [&]() -> Status { return fua ? Flush() : Ok(); };
  auto failed = [&](int err) {
    return Fail(Error::Errno(err, "zero " + path_ + " at " + std::to_string(offset)));
  };
  if (may_trim) {
    int err = Fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (err == 0) return done();
    if (!FallocateUnsupported(err)) return failed(err);
  }
  int err = Fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
  if (err == 0) return done();
  if (!FallocateUnsupported(err)) return failed(err);
  if (fast)
    return Fail(Error::NotSupported("fast zero: " + path_ + " cannot zero without writing"));
  if (auto s = WriteZeroes(offset, length); !s) return s;
  return done();
}

Status FileBackend::WriteZeroes(uint64_t offset, uint64_t length) {
  static const std::vector<std::byte> zeroes(1 << 20);
  while (length > 0) {
    size_t n = size_t(std::min<uint64_t>(length, zeroes.size()));
    if (auto s = posix::PwriteFull(fd_, std::span(zeroes.data(), n), offset, path_); !s) return s;
    offset += n;
    length -= n;
  }
  return Ok();
}

Status FileBackend::Cache(uint64_t, uint64_t) { return Ok(); }

std::optional<FileRange> FileBackend::FileRangeFor(uint64_t offset, uint64_t) {
  return FileRange{fd_, offset};
}

Result<std::vector<Extent>> FileBackend::Extents(uint64_t offset, uint64_t length) {
  std::vector<Extent> out;
  const uint64_t end = std::min(offset + length, size_);
  auto push = [&](uint64_t len, bool hole) {
    if (len == 0) return;
    if (!out.empty() && out.back().hole == hole) {
      out.back().length += len;
    } else {
      out.push_back({len, hole, hole});
    }
  };
  uint64_t pos = offset;
  while (pos < end && out.size() < kMaxExtentsPerCall) {
    off_t data = ::lseek(fd_, off_t(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {  // no data after pos: the rest is a hole
        push(end - pos, true);
        break;
      }
      if (errno == EINVAL || errno == EOPNOTSUPP) {  // no hole support: all data
        push(end - pos, false);
        break;
      }
      return Fail(Error::Errno(errno, "SEEK_DATA " + path_));
    }
    uint64_t d = std::min<uint64_t>(uint64_t(data), end);
    if (d > pos) {
      push(d - pos, true);
      pos = d;
      continue;
    }
    off_t hole = ::lseek(fd_, off_t(pos), SEEK_HOLE);
    if (hole < 0) {
      if (errno == EINVAL || errno == EOPNOTSUPP || errno == ENXIO) {
        push(end - pos, false);
        break;
      }
      return Fail(Error::Errno(errno, "SEEK_HOLE " + path_));
    }
    uint64_t h = std::min<uint64_t>(uint64_t(hole), end);
    if (h <= pos) h = end;  // raced with a concurrent write; report data, which is safe
    push(h - pos, false);
    pos = h;
  }
  if (out.empty()) out.push_back({end > offset ? end - offset : 0, false, false});
  return out;
}

}  // namespace kagemusha::storage
