// Shared command-line scaffolding for every Kagemusha executable: one
// subcommand table per program (ninja-style: name, description, function),
// the top-level usage text, --help/--version handling, uniform usage and
// runtime error messages, and Boost.Program_options parsing with the
// project's exit codes (0 help, 1 runtime failure, 2 usage error).
//
// Exceptions are allowed here and only here: RunProgram is the CLI boundary
// and turns any escaping exception into an error message and exit code 1.
//
// Thread-safety: call from main's thread only.
#pragma once

#include <boost/program_options.hpp>
#include <span>
#include <string>

namespace kagemusha::cli {

struct Subcommand {
  const char* name;
  const char* description;
  int (*run)(int argc, char** argv);  // argv[0] is the subcommand name
};

struct Program {
  const char* name;     // e.g. "kagemusha-nbd"
  const char* summary;  // one paragraph for the top-level usage
  const char* version;
  std::span<const Subcommand> commands;
  const char* footer = nullptr;  // e.g. "See docs/cli.md for the full reference."
};

// Dispatches argv[1] to a subcommand of `program`. Also sets the program
// name used by the error helpers below and ignores SIGPIPE.
int RunProgram(const Program& program, int argc, char** argv);

std::string TopLevelUsage(const Program& program);

// The name RunProgram was started with ("kagemusha" before that).
const char* ProgramName();

// "PROG COMMAND: MESSAGE / Run `PROG COMMAND --help` for usage." → 2.
int UsageError(const std::string& command, const std::string& message);
// "PROG: error: MESSAGE [/ hint: HINT]" → 1.
int RuntimeError(const std::string& message, const std::string& hint = {});

// Parses argv (argv[0] = subcommand name) into vm. Returns -1 on success, or
// the exit code to return: 0 after printing --help, 2 on bad options.
int ParseCommandLine(const std::string& command, const std::string& usage,
                     const boost::program_options::options_description& visible,
                     const boost::program_options::options_description& all,
                     const boost::program_options::positional_options_description& positional,
                     int argc, char** argv, boost::program_options::variables_map& vm);
int ParseCommandLine(const std::string& command, const std::string& usage,
                     const boost::program_options::options_description& options, int argc,
                     char** argv, boost::program_options::variables_map& vm);

}  // namespace kagemusha::cli
