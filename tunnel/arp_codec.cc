// ARP codec. See arp.h. Pure: no I/O.
#include <algorithm>
#include <string>

#include "kagemusha/common/coding.h"
#include "kagemusha/tunnel/arp.h"

namespace kagemusha::tunnel {

std::vector<uint8_t> EncodeArp(const ArpPacket& p) {
  std::vector<uint8_t> out;
  out.reserve(kArpPacketSize);
  ByteWriter w(out);
  w.U16(kArpHardwareEthernet);
  w.U16(ethertype::kIpv4);
  w.U8(6);
  w.U8(4);
  w.U16(p.operation);
  w.Bytes(p.sender_mac);
  w.Bytes(p.sender_ip);
  w.Bytes(p.target_mac);
  w.Bytes(p.target_ip);
  return out;
}

Result<ArpPacket> DecodeArp(std::span<const uint8_t> data) {
  if (data.size() < kArpPacketSize)
    return Fail(
        Error::Protocol("ARP packet is " + std::to_string(data.size()) + " bytes, expected 28"));
  if (LoadBe16(&data[0]) != kArpHardwareEthernet)
    return Fail(Error::Protocol("ARP hardware type is not Ethernet"));
  if (LoadBe16(&data[2]) != ethertype::kIpv4)
    return Fail(Error::Protocol("ARP protocol type is not IPv4"));
  if (data[4] != 6 || data[5] != 4)
    return Fail(Error::Protocol("ARP address lengths are not 6 and 4"));
  ArpPacket p;
  p.operation = LoadBe16(&data[6]);
  if (p.operation != kArpOpRequest && p.operation != kArpOpReply)
    return Fail(Error::Protocol("ARP operation " + std::to_string(p.operation) +
                                " is neither request nor reply"));
  std::copy(data.data() + 8, data.data() + 14, p.sender_mac.begin());
  std::copy(data.data() + 14, data.data() + 18, p.sender_ip.begin());
  std::copy(data.data() + 18, data.data() + 24, p.target_mac.begin());
  std::copy(data.data() + 24, data.data() + 28, p.target_ip.begin());
  return p;
}

bool IsGratuitous(const ArpPacket& p) { return p.sender_ip == p.target_ip; }

std::vector<uint8_t> BuildGratuitousArpFrame(const MacAddress& mac, const Ipv4Address& ip,
                                             bool reply) {
  ArpPacket p;
  p.operation = reply ? kArpOpReply : kArpOpRequest;
  p.sender_mac = mac;
  p.sender_ip = ip;
  p.target_mac = reply ? mac : MacAddress{};
  p.target_ip = ip;
  return BuildEthernetFrame(kBroadcastMac, mac, ethertype::kArp, EncodeArp(p));
}

}  // namespace kagemusha::tunnel
