#include "cli_app.h"

#include <csignal>
#include <cstdio>
#include <exception>
#include <iostream>

namespace po = boost::program_options;

namespace kagemusha::cli {
namespace {
const char* g_program = "kagemusha";
}  // namespace

const char* ProgramName() { return g_program; }

std::string TopLevelUsage(const Program& p) {
  std::string s = std::string("Usage: ") + p.name + " COMMAND [OPTIONS]\n       " + p.name +
                  " COMMAND --help\n       " + p.name + " --version\n\n" + p.summary +
                  "\n\nCommands:\n";
  for (const auto& c : p.commands) {
    char line[256];
    std::snprintf(line, sizeof line, "  %-12s %s\n", c.name, c.description);
    s += line;
  }
  s += std::string("\nRun `") + p.name + " COMMAND --help` for a command's options.\n";
  if (p.footer) s += std::string(p.footer) + "\n";
  return s;
}

int RunProgram(const Program& p, int argc, char** argv) {
  g_program = p.name;
  std::signal(SIGPIPE, SIG_IGN);  // a vanished peer is an error value, not a death
  if (argc < 2) {
    std::fprintf(stderr, "%s", TopLevelUsage(p).c_str());
    return 2;
  }
  const std::string first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    std::printf("%s", TopLevelUsage(p).c_str());
    return 0;
  }
  if (first == "--version" || first == "-V") {
    std::printf("%s %s\n", p.name, p.version);
    return 0;
  }
  for (const auto& c : p.commands) {
    if (first != c.name) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const std::exception& e) {  // the CLI boundary: report, never crash
      std::fprintf(stderr, "%s %s: error: %s\n", p.name, c.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "%s: unknown command '%s'; run `%s --help` for the list\n", p.name,
               first.c_str(), p.name);
  return 2;
}

int UsageError(const std::string& command, const std::string& message) {
  std::fprintf(stderr, "%s %s: %s\nRun `%s %s --help` for usage.\n", g_program, command.c_str(),
               message.c_str(), g_program, command.c_str());
  return 2;
}

int RuntimeError(const std::string& message, const std::string& hint) {
  std::fprintf(stderr, "%s: error: %s\n", g_program, message.c_str());
  if (!hint.empty()) std::fprintf(stderr, "hint: %s\n", hint.c_str());
  return 1;
}

int ParseCommandLine(const std::string& command, const std::string& usage,
                     const po::options_description& visible, const po::options_description& all,
                     const po::positional_options_description& positional, int argc, char** argv,
                     po::variables_map& vm) {
  try {
    // The (argc, argv) form skips argv[0], which is the subcommand name here.
    po::store(po::command_line_parser(argc, argv).options(all).positional(positional).run(), vm);
    if (vm.count("help")) {
      std::cout << "Usage: " << usage << "\n\n" << visible << "\n";
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    return UsageError(command, e.what());
  }
  return -1;
}

int ParseCommandLine(const std::string& command, const std::string& usage,
                     const po::options_description& options, int argc, char** argv,
                     po::variables_map& vm) {
  return ParseCommandLine(command, usage, options, options, po::positional_options_description(),
                          argc, argv, vm);
}

}  // namespace kagemusha::cli
