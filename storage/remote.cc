// RemoteReader's default ReadToFile: through a buffer.
#include "kagemusha/storage/remote.h"

#include <algorithm>
#include <memory>

#include "posix_io.h"

namespace kagemusha::storage {

Status RemoteReader::ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset,
                                ReadToFileFault* fault) {
  constexpr uint64_t kChunk = 4 * 1024 * 1024;
  const size_t cap = size_t(std::min(length, kChunk));
  std::unique_ptr<std::byte[]> buf(new std::byte[cap]);
  for (uint64_t done = 0; done < length;) {
    const std::span<std::byte> chunk(buf.get(), size_t(std::min(length - done, kChunk)));
    if (auto s = Read(chunk, offset + done); !s) {
      if (fault) *fault = ReadToFileFault::kRemote;
      return s;
    }
    if (auto s = posix::PwriteFull(fd, chunk, file_offset + done, "fetched data"); !s) {
      if (fault) *fault = ReadToFileFault::kFile;
      return s;
    }
    done += chunk.size();
  }
  return Ok();
}

}  // namespace kagemusha::storage
