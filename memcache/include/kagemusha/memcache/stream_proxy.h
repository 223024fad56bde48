// The MiyakoDori migration-stream proxies (issue 4 §2):
//
//   source QEMU ──► encoder ══ reuse protocol (WAN) ══► decoder ──► dest QEMU
//               ◄── (return path bytes, relayed backwards on the same sockets) ◄──
//
// The ENCODER (source host) parses the QEMU migration stream
// (MigrationStreamParser), learns every page into its host's PageStore, and
// replaces each page the destination said it holds (SUMMARY) with a PAGE_REF;
// everything it does not rewrite goes out byte-exact as PASSTHROUGH. The
// DECODER (destination host) answers HELLO with a SUMMARY drawn from its
// store's manifest for the VM, rebuilds the exact source stream for the
// destination QEMU (a reference is looked up and its SHA-256 re-checked:
// never wrong data), learns every page it delivers, and relays the
// destination QEMU's return path back to the encoder. Protocol, states and
// failure rules: docs/memcache-proxies.md.
//
// Both sessions are blocking, two threads each (the forward stream and the
// backward relay); one session per migration. Any protocol error, a missing
// page or an END mismatch ABORTS: both QEMU connections are closed, so the
// destination sees a failed incoming migration and the source VM keeps
// running.
//
// ByteStream is the transport seam: SocketStream for TCP (TCP_NODELAY), and
// MakeMemoryPipe() for the in-memory fake used by unit tests.
//
// Thread-safety: a ByteStream's Read may run concurrently with its Write
// (one reader thread, one writer thread), and Abort() may be called from any
// thread at any time. The Run* functions are self-contained.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "kagemusha/common/error.h"
#include "kagemusha/memcache/page_store.h"

namespace kagemusha::memcache {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Reads at least one byte; 0 means the peer closed its sending side.
  virtual Result<size_t> Read(std::span<uint8_t> buf) = 0;
  virtual Status WriteAll(std::span<const uint8_t> bytes) = 0;
  // Half-close: the peer reads EOF after the bytes already written.
  virtual void ShutdownWrite() = 0;
  // Both directions, now; wakes a blocked Read or WriteAll (which then fail
  // or see EOF). Idempotent.
  virtual void Abort() = 0;
  // Later Reads fail with ETIMEDOUT after `timeout` without data; 0: wait
  // forever (the default). The sessions use it for the handshake and, after
  // it, for the forward direction only (the idle timeout): the return path
  // may legitimately be silent for a whole precopy migration.
  virtual void SetReadTimeout(std::chrono::milliseconds timeout) = 0;
  // Later WriteAlls fail with ETIMEDOUT once the peer has taken no byte for
  // `timeout` (it stopped reading); 0: wait forever (the default).
  virtual void SetWriteTimeout(std::chrono::milliseconds timeout) = 0;
};

// A connected TCP socket (owned; closed on destruction).
class SocketStream final : public ByteStream {
 public:
  explicit SocketStream(int fd);  // sets TCP_NODELAY
  ~SocketStream() override;
  SocketStream(const SocketStream&) = delete;
  SocketStream& operator=(const SocketStream&) = delete;

  // HOST:PORT or [V6]:PORT.
  static Result<std::unique_ptr<SocketStream>> Connect(const std::string& host_port,
                                                       std::chrono::milliseconds timeout);

  Result<size_t> Read(std::span<uint8_t> buf) override;
  Status WriteAll(std::span<const uint8_t> bytes) override;
  void ShutdownWrite() override;
  void Abort() override;
  void SetReadTimeout(std::chrono::milliseconds timeout) override;
  void SetWriteTimeout(std::chrono::milliseconds timeout) override;
  // SO_SNDBUF (the kernel doubles it; autotuning stops): bounds the bytes
  // this side has written that the peer has not received yet.
  void SetSendBuffer(int bytes);
  int fd() const { return fd_; }

 private:
  int fd_;
};

// A listening TCP socket bound to exactly the given address (never a
// wildcard unless written out). Port 0 picks a free port (see port()).
class TcpListener {
 public:
  static Result<std::unique_ptr<TcpListener>> Listen(const std::string& host_port);
  ~TcpListener();
  TcpListener(const TcpListener&) = delete;
  TcpListener& operator=(const TcpListener&) = delete;
  Result<std::unique_ptr<SocketStream>> Accept();
  uint16_t port() const { return port_; }
  std::string address() const;  // "host:port" as bound
  void Close();                 // wakes a blocked Accept

 private:
  TcpListener(int fd, std::string host, uint16_t port)
      : fd_(fd), host_(std::move(host)), port_(port) {}
  int fd_;
  std::string host_;
  uint16_t port_;
};

// "host:port" / "[v6]:port" -> (host, port). EINVAL with a message otherwise.
Result<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& host_port);

// Two connected in-memory endpoints (the fake transport for tests). Writes
// block once `capacity` bytes are queued, like a socket buffer.
std::pair<std::unique_ptr<ByteStream>, std::unique_ptr<ByteStream>> MakeMemoryPipe(
    size_t capacity = 1u << 20);

// What one proxy session did. "in"/"out" are from this proxy's view of the
// forward (source -> destination) direction.
struct ProxyStats {
  uint64_t qemu_bytes = 0;       // migration-stream bytes read (encoder) / written (decoder)
  uint64_t wan_bytes_out = 0;    // bytes this proxy sent on the WAN leg
  uint64_t wan_bytes_in = 0;     // bytes this proxy received on the WAN leg
  uint64_t return_bytes = 0;     // return-path bytes relayed (dest -> source)
  uint64_t pages = 0;            // page records (PAGE + ZERO), both phases
  uint64_t ref_pages = 0;        // sent / resolved as PAGE_REF
  uint64_t literal_pages = 0;    // sent / received as LITERAL(_ZSTD)
  uint64_t zstd_pages = 0;       // ... of which compressed
  uint64_t zero_pages = 0;       // ZERO records
  uint64_t postcopy_pages = 0;   // pages outside the rewriting window
  uint64_t summary_entries = 0;  // digest prefixes in the decoder's SUMMARY
  bool fell_back = false;        // the parser stopped understanding the stream
  std::string fallback_reason;
  bool learned = false;              // manifest written for the VM
  uint64_t learned_pages = 0;        // pages handed to the page store (new or already there)
  uint64_t end_wait_us = 0;          // forward thread waiting for the learner before END
  uint64_t learn_skipped_pages = 0;  // hashed but not stored: worker overloaded, store
                                     // error, or (decoder) SUMMARY pages pinned at quota
  uint64_t forward_wan_bytes = 0;    // reuse-protocol bytes source -> destination
  // forward_wan_bytes / qemu_bytes (1.0 = no gain; < 1 is a saving).
  double ratio() const;
};

struct EncoderOptions {
  PageStore* store = nullptr;  // required: learns the VM's image, refs come from SUMMARY
  std::string vm;              // manifest name; must match the decoder's
  bool zstd = false;           // compress literal pages when the decoder can
  std::array<uint8_t, 16> uuid{};
  // Limit for the decoder's HELLO and SUMMARY to arrive.
  std::chrono::milliseconds handshake_timeout{30000};
  // After the handshake: the migration fails (ETIMEDOUT) if the source QEMU
  // sends nothing, or the decoder takes no byte, for this long. 0: no limit.
  std::chrono::milliseconds idle_timeout{60000};
  // Page data waiting to be hashed and learned behind the forward path;
  // beyond it pages are hashed in line and not learned (learn_skipped_pages).
  size_t learn_queue_bytes = 64u << 20;
  // Flow control (when the decoder reports DELIVERED, cap::kDelivered): at
  // most this many bytes of the QEMU stream are read from the source QEMU
  // and not yet written to the destination QEMU. Bounds what is still
  // queued between the proxies when the source stops the VM (it all has to
  // arrive inside the downtime; a reference expands 89-fold at the
  // destination, so without it socket buffers full of references hold
  // hundreds of MB of stream). Should cover the WAN's bandwidth x RTT (20 ms
  // at 500 Mbit/s: 1.25 MB). 0: no limit; otherwise at least
  // kMinFlowWindowBytes.
  size_t window_bytes = 4u << 20;
};
inline constexpr size_t kMinFlowWindowBytes = 1u << 20;

// Runs one migration through the encoder. `qemu` is the connection the
// source QEMU opened to us; `wan` the connection to the decoder. On return
// both have been aborted or cleanly closed. An error means the migration
// was aborted (reason in the message); the stats are then in *partial if
// given.
Result<ProxyStats> RunEncoderSession(ByteStream& qemu, ByteStream& wan,
                                     const EncoderOptions& options, ProxyStats* partial = nullptr);

struct DecoderOptions {
  PageStore* store = nullptr;  // required
  std::string vm;              // expected VM name (HELLO must match); empty: any
  std::chrono::milliseconds handshake_timeout{30000};  // for the encoder's HELLO
  // After the handshake: the migration fails (ETIMEDOUT) if the encoder sends
  // nothing, or the destination QEMU takes no byte, for this long. 0: no limit.
  std::chrono::milliseconds idle_timeout{60000};
  size_t learn_queue_bytes = 64u << 20;  // as for the encoder
  // The store's quota (PageStoreOptions::quota_bytes; 0: none). While
  // references may still arrive, learning never grows the store past it, so
  // a quota eviction cannot drop a page the SUMMARY offered.
  uint64_t store_quota_bytes = 0;
};

// Connects to the destination QEMU's incoming port (called once, after HELLO).
using QemuConnector = std::function<Result<std::unique_ptr<ByteStream>>()>;

Result<ProxyStats> RunDecoderSession(ByteStream& wan, const QemuConnector& connect_qemu,
                                     const DecoderOptions& options, ProxyStats* partial = nullptr);

}  // namespace kagemusha::memcache
