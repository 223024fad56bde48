// Error values shared by every Kagemusha library.
//
// Library code returns Result<T> (std::expected<T, Error>) and never throws on
// a data path. An Error carries an errno-style code, because the wire
// protocols we speak (NBD, Mobility Header status) map naturally onto it, and a
// message written for the operator: what failed and, where known, what to do.
//
// Thread-safety: plain value types.
#pragma once

#include <cerrno>
#include <cstdint>
#include <expected>
#include <string>
#include <utility>

namespace kagemusha {

class Error {
 public:
  Error() = default;
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}

  static Error Errno(int code, std::string what);  // appends strerror(code)
  static Error Invalid(std::string what) { return {EINVAL, std::move(what)}; }
  static Error Io(std::string what) { return {EIO, std::move(what)}; }
  static Error NotSupported(std::string what) { return {ENOTSUP, std::move(what)}; }
  static Error Protocol(std::string what) { return {EPROTO, std::move(what)}; }
  static Error Timeout(std::string what) { return {ETIMEDOUT, std::move(what)}; }
  static Error Shutdown(std::string what) { return {ESHUTDOWN, std::move(what)}; }
  static Error NoSpace(std::string what) { return {ENOSPC, std::move(what)}; }
  static Error Permission(std::string what) { return {EPERM, std::move(what)}; }

  int code() const { return code_; }
  const std::string& message() const { return message_; }

  // Adds context in front: "opening cache: <old message>".
  Error Context(const std::string& where) const { return {code_, where + ": " + message_}; }

 private:
  int code_ = EIO;
  std::string message_;
};

template <class T>
using Result = std::expected<T, Error>;

using Status = Result<void>;

inline Status Ok() { return {}; }

inline std::unexpected<Error> Fail(Error e) { return std::unexpected<Error>(std::move(e)); }

}  // namespace kagemusha
