// RemoteReader's default ReadToFile: through a buffer.
#include "kagemusha/storage/remote.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <string>

namespace kagemusha::storage {

Status RemoteReader::ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset) {
  constexpr uint64_t kChunk = 4 * 1024 * 1024;
  std::unique_ptr<std::byte[]> buf(new std::byte[std::min(length, kChunk)]);
  for (uint64_t done = 0; done < length;) {
    const size_t n = size_t(std::min(length - done, kChunk));
    if (auto s = Read(std::span<std::byte>(buf.get(), n), offset + done); !s) return s;
    for (size_t w = 0; w < n;) {
      ssize_t k = ::pwrite(fd, buf.get() + w, n - w, off_t(file_offset + done + w));
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0)
        return Fail(Error::Errno(k < 0 ? errno : EIO, "writing fetched data at file offset " +
                                                          std::to_string(file_offset + done + w)));
      w += size_t(k);
    }
    done += n;
  }
  return Ok();
}

}  // namespace kagemusha::storage
