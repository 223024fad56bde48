#include "kagemusha/common/error.h"

#include <cstring>

namespace kagemusha {

Error Error::Errno(int code, std::string what) {
  what += ": ";
  what += std::strerror(code);
  return {code, std::move(what)};
}

}  // namespace kagemusha
