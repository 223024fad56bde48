// kagemusha-nbd: picks a subcommand from the table in nbd_commands.h and runs
// it. All option parsing and wiring lives in the subcommands.
#include "nbd_commands.h"

int main(int argc, char** argv) {
  return kagemusha::cli::RunProgram(kagemusha::nbdcli::NbdProgram(), argc, argv);
}
