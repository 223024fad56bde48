// kagemusha-nbd: the subcommands of the NBD server binary, the option-value
// parsers they share, and the control commands the server answers.
//
// main() only picks a subcommand from NbdSubcommands() and runs it. Each
// subcommand parses its own options (Boost.Program_options; exceptions stop
// at this boundary) and returns the process exit code:
//   0 success, 1 runtime failure (server error, unreachable remote or
//   control socket), 2 usage error (bad options; the message says what to do).
// The interface is specified in docs/cli.md; the control wire format in
// docs/control-api.md.
//
// Thread-safety: the parsers are pure; the control command handlers run on
// the control server's single thread and call thread-safe backend methods.
#pragma once

#include "cli_app.h"

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "kagemusha/common/control_socket.h"
#include "kagemusha/common/error.h"
#include "kagemusha/storage/backend.h"
#include "kagemusha/storage/copy_on_read.h"
#include "kagemusha/storage/nbd_client.h"
#include "kagemusha/storage/nbd_server.h"

namespace kagemusha::nbdcli {

// --- option values (pure) -----------------------------------------------------

// "123", "64K", "4M", "1G" (binary multiples, either case). Overflow and
// trailing junk are errors. `what` names the option in the message.
Result<uint64_t> ParseByteCount(const std::string& text, const std::string& what);
// As ParseByteCount; 0 means unlimited. Bytes per second.
Result<uint64_t> ParseRate(const std::string& text);

// --export NAME=PATH[,ro][,desc=TEXT]. desc takes the rest of the value, so
// it may contain commas; PATH may not.
struct ExportSpec {
  std::string name;
  std::string path;
  bool read_only = false;
  std::string description;
};
Result<ExportSpec> ParseExportSpec(const std::string& text);

// --proxy NAME=URI,cache=PATH,bitmap=PATH[,block-size=BYTES][,fill-rate=RATE]
//         [,no-fill][,auto-switch][,desc=TEXT]
struct ProxySpec {
  std::string name;
  storage::NbdUri uri;
  std::string uri_text;  // as given, for messages
  std::string cache_path;
  std::string bitmap_path;
  uint32_t block_size = 64 * 1024;
  uint64_t fill_rate = 0;
  bool fill = true;
  bool auto_switch = false;
  std::string description;
};
Result<ProxySpec> ParseProxySpec(const std::string& text);

// --listen HOST:PORT or [V6]:PORT. The host is required, so a wildcard
// address is only ever bound when written out (0.0.0.0, [::]).
Status CheckListenAddress(const std::string& host_port);

// --- the serving side -----------------------------------------------------------

// One export as the server runs it. `proxy` is set for --proxy exports and
// aliases `backend`.
struct ServedExport {
  std::string name;
  std::string description;
  std::string source;  // image path, or the remote URI for a proxy
  bool read_only = false;
  std::string cache_path, bitmap_path;  // proxies only
  std::shared_ptr<storage::Backend> backend;
  std::shared_ptr<storage::CopyOnReadBackend> proxy;
};

// What the control commands act on. `server` may be null in tests.
struct ServeState {
  std::vector<ServedExport> exports;
  storage::NbdServer* server = nullptr;
};

// The status document of one export ("mode", "blocks_present", ...; see
// docs/control-api.md).
nlohmann::json ExportStatusJson(const ServedExport& e);

// The control command table of `kagemusha-nbd serve`: status, fill-start,
// fill-stop, fill-rate, switch, reconnect. `state` must outlive the server.
std::vector<ControlCommand> NbdControlCommands(ServeState& state);

// The failure `switch` reports while blocks are missing, with the hint that
// tells the operator what to do.
ControlFailure SwitchNotReady(const storage::FillStatus& st, const Error& cause);

// Human rendering of a "status" result (one block per export, then server).
std::string FormatStatusHuman(const nlohmann::json& status);

// --- subcommands ----------------------------------------------------------------

using Subcommand = cli::Subcommand;

const std::vector<Subcommand>& NbdSubcommands();

// `kagemusha-nbd --help`.
std::string TopLevelUsage();
// The program description RunProgram dispatches from (main).
const cli::Program& NbdProgram();

}  // namespace kagemusha::nbdcli
