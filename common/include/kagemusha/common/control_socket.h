// A local, authenticated control API for long-running Kagemusha daemons.
//
// The server listens on a Unix stream socket. Each request is one line of
// JSON, each reply is one line of JSON (wire format and versioning:
// docs/control-api.md). Commands come from one table of {name, description,
// handler}, like ninja's subtools; the built-in command "commands" lists it.
//
// Security: the socket file is created 0600, inside a directory created 0700
// if it does not exist yet, and every peer is checked with SO_PEERCRED: only
// root and the server's own effective uid may talk. Other peers get an error
// reply, are disconnected and logged as a warning.
//
// Robustness: requests are limited in size; a malformed request gets an error
// reply and the connection stays usable; a client that disconnects mid-request
// or never sends anything affects nobody else.
//
// Thread-safety: ControlServer runs one thread with poll(2). Handlers run on
// that thread, one at a time, so they must be quick (read a status, flip a
// flag); a handler must not call back into the same server. Stop() and the
// destructor may be called from any other thread. ControlCall is reentrant.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <expected>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "kagemusha/common/error.h"

namespace kagemusha {

// Version of the request/reply envelope. Bumped on incompatible changes; the
// server rejects requests that carry a different major version.
inline constexpr int kControlApiVersion = 1;

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// True if `peer` may use a control socket owned by `server_uid`: root, or the
// same uid as the server.
bool ControlPeerAllowed(const PeerCredentials& peer, uid_t server_uid);

// What a failed command reports: the error, and optionally what the operator
// should do next ("run `kagemusha-nbd switch --wait`"). Implicitly built from
// an Error, so a handler can `return Fail(error)`.
struct ControlFailure {
  ControlFailure(Error e, std::string h = {}) : error(std::move(e)), hint(std::move(h)) {}
  Error error;
  std::string hint;
};
using ControlResult = std::expected<nlohmann::json, ControlFailure>;

// A handler receives the request's "args" object (an empty object if the
// request had none) and returns the "result" value or a failure, which
// becomes an error reply.
using ControlHandler = std::function<ControlResult(const nlohmann::json& args)>;

struct ControlCommand {
  std::string name;
  std::string description;
  ControlHandler handler;
};

struct ControlServerOptions {
  std::string socket_path;
  size_t max_request_bytes = 64 * 1024;  // one line, including the newline
  size_t max_clients = 64;               // further connections are refused
  // Peer authorization; the default admits root and the server's euid. A
  // seam for tests, and for daemons that want a stricter rule.
  std::function<bool(const PeerCredentials&)> authorize;
};

class ControlServer {
 public:
  // Creates the directory (0700) if missing, binds the socket (0600),
  // replacing a stale socket file but refusing to replace a live one or a
  // non-socket, and starts the server thread.
  static Result<std::unique_ptr<ControlServer>> Start(ControlServerOptions options,
                                                      std::vector<ControlCommand> commands);
  // Stops the thread and removes the socket file.
  virtual ~ControlServer() = default;
  virtual void Stop() = 0;
  virtual const std::string& socket_path() const = 0;
};

// A decoded reply.
struct ControlReply {
  bool ok = false;
  nlohmann::json result;  // when ok
  int error_code = 0;     // errno value, when !ok
  std::string error_message;
  std::string hint;  // may be empty
};

// Sends one request and reads one reply, with `timeout` covering connect,
// send and receive. Fails (Result error) only for transport problems and
// unparseable replies; a well-formed error reply is a ControlReply with
// ok == false. The server is also authenticated: a socket whose owner process
// is neither root nor our own uid is refused.
Result<ControlReply> ControlCall(const std::string& socket_path, const std::string& command,
                                 const nlohmann::json& args, std::chrono::milliseconds timeout);

// Pure envelope helpers, shared by server, client and tests.
nlohmann::json MakeControlRequest(const std::string& command, const nlohmann::json& args);
nlohmann::json MakeControlOkReply(const nlohmann::json& id, const nlohmann::json& result);
nlohmann::json MakeControlErrorReply(const nlohmann::json& id, const ControlFailure& failure);
Result<ControlReply> ParseControlReply(const std::string& line);

// Makes `path` free for a new Unix socket: nothing there, or a socket no
// server answers on (left by a dead one), which is removed. A live socket is
// EADDRINUSE, anything else there an error; both name `flag`, the option
// the operator would change.
Status ClearStaleUnixSocket(const std::string& path, const std::string& flag);
// errno value to its symbolic name ("EAGAIN"), "E<n>" if unknown.
std::string ErrnoName(int code);

}  // namespace kagemusha
