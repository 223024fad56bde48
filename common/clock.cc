#include "kagemusha/common/clock.h"

#include <thread>

namespace kagemusha {

void SteadyClock::SleepFor(Duration d) { std::this_thread::sleep_for(d); }

SteadyClock& SteadyClock::Instance() {
  static SteadyClock clock;
  return clock;
}

}  // namespace kagemusha
