// The whole proxy chain over real sockets, inside one process:
//
//   NbdClient ──► NbdServer(proxy) ──► CopyOnReadBackend ──► NbdClient ──►
//                                                     NbdServer(source) ──► FileBackend
//
// It checks that the pieces fit: reads through the proxy equal the source,
// writes land in the cache and not the source, the fill completes, and after
// the switch the proxy keeps serving its connected client with the source
// server gone.
#include <gtest/gtest.h>

#include <thread>

#include "fake_remote.h"
#include "kagemusha/storage/copy_on_read.h"
#include "kagemusha/storage/file_backend.h"
#include "kagemusha/storage/nbd_client.h"
#include "kagemusha/storage/nbd_server.h"
#include "test_util.h"

namespace kagemusha::storage {
namespace {

using namespace std::chrono_literals;
using testing::ReadFileBytes;
using testing::ScratchDir;
using testing::WaitUntil;
using testing::WriteFileBytes;

constexpr uint64_t kMiB = 1024 * 1024;

NbdUri UnixSocket(const std::string& path) {
  NbdUri u;
  u.transport = NbdUri::Transport::kUnix;
  u.socket_path = path;
  return u;
}

class RunningServer {
 public:
  RunningServer(std::shared_ptr<Backend> backend, const std::string& socket) {
    server_ = NbdServer::Create({});
    EXPECT_TRUE(server_->AddExport({"", "", std::move(backend), false}));
    auto s = server_->ListenUnix(socket);
    EXPECT_TRUE(s) << (s ? "" : s.error().message());
    thread_ = std::thread([this] { server_->Run(); });
  }
  ~RunningServer() { Stop(); }
  void Stop() {
    if (!thread_.joinable()) return;
    server_->Stop();
    thread_.join();
  }

 private:
  std::unique_ptr<NbdServer> server_;
  std::thread thread_;
};

TEST(CopyOnReadOverNbd, ProxyChainServesFillsAndSwitchesWithTheClientConnected) {
  ScratchDir dir;
  auto image = FakeRemote::PatternImage(16 * kMiB, 9);
  WriteFileBytes(dir / "source.img", image);
  auto source = FileBackend::Open(dir / "source.img");
  ASSERT_TRUE(source.has_value());
  RunningServer source_server(std::shared_ptr<Backend>(std::move(*source)), dir / "source.sock");

  NbdClientOptions copts;
  copts.wait_bound = 2000ms;
  auto remote = NbdClient::Connect(UnixSocket(dir / "source.sock"), copts);
  ASSERT_TRUE(remote.has_value()) << remote.error().message();
  CopyOnReadOptions o;
  o.cache_path = dir / "cache.img";
  o.bitmap_path = dir / "cache.bitmap";
  o.fill_on_start = false;
  auto cor = CopyOnReadBackend::Open(std::move(*remote), o);
  ASSERT_TRUE(cor.has_value()) << cor.error().message();
  RunningServer proxy_server(*cor, dir / "proxy.sock");

  auto client = NbdClient::Connect(UnixSocket(dir / "proxy.sock"), copts);
  ASSERT_TRUE(client.has_value()) << client.error().message();
  ASSERT_EQ((*client)->Size(), 16 * kMiB);

  // On-demand reads through the proxy.
  std::vector<std::byte> buf(3 * kMiB + 100);
  ASSERT_TRUE((*client)->Read(buf, 5 * kMiB + 7));
  EXPECT_EQ(0, std::memcmp(buf.data(), image.data() + 5 * kMiB + 7, buf.size()));
  EXPECT_GT((*cor)->Status().blocks_present, 0u);

  // A write to the proxy backend (NbdClient is read-only) goes to the cache only.
  std::vector<std::byte> data(100000, std::byte{0x5e});
  ASSERT_TRUE((*cor)->Write(data, 12345, /*fua=*/true));

  (*cor)->StartFill();
  ASSERT_TRUE(WaitUntil([&] { return (*cor)->Status().complete; }, 8s));
  ASSERT_TRUE((*cor)->SwitchToTarget());
  source_server.Stop();  // the source is gone; the proxy no longer needs it

  std::vector<std::byte> all(16 * kMiB);
  ASSERT_TRUE((*client)->Read(all, 0));
  auto expect = image;
  std::fill(expect.begin() + 12345, expect.begin() + 12345 + 100000, std::byte{0x5e});
  EXPECT_TRUE(all == expect);
  EXPECT_EQ(ReadFileBytes(dir / "source.img"), image);  // the source was never written
  EXPECT_EQ((*cor)->Status().mode, "target");
  (*client)->Close();
  proxy_server.Stop();
}

}  // namespace
}  // namespace kagemusha::storage
