// kagemusha-nbd: picks a subcommand from the table in nbd_commands.h and runs
// it. All option parsing and wiring lives in the subcommands.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "nbd_commands.h"

#ifndef KAGEMUSHA_VERSION
#define KAGEMUSHA_VERSION "unknown"
#endif

int main(int argc, char** argv) {
  using kagemusha::nbdcli::NbdSubcommands;
  if (argc < 2) {
    std::fprintf(stderr, "%s", kagemusha::nbdcli::TopLevelUsage().c_str());
    return 2;
  }
  const std::string first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    std::printf("%s", kagemusha::nbdcli::TopLevelUsage().c_str());
    return 0;
  }
  if (first == "--version" || first == "-V") {
    std::printf("kagemusha-nbd %s\n", KAGEMUSHA_VERSION);
    return 0;
  }
  for (const auto& command : NbdSubcommands()) {
    if (first != command.name) continue;
    try {
      return command.run(argc - 1, argv + 1);
    } catch (const std::exception& e) {  // the CLI boundary: report, never crash
      std::fprintf(stderr, "kagemusha-nbd %s: error: %s\n", command.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr,
               "kagemusha-nbd: unknown command '%s'; run `kagemusha-nbd --help` for the list\n",
               first.c_str());
  return 2;
}
