/* Kagemusha tunnel fast path: IPv6-in-IPv6 and IPv4-in-IPv6 (RFC 2473,
 * DSMIPv6 RFC 5555) encapsulation and decapsulation in tc (clsact)
 * programs, so a tunnelled packet stays in the kernel instead of crossing
 * user space twice. Everything these programs do not take (ND, ARP,
 * Mobility Header, IPv4 options and fragments, oversize packets,
 * link-local, failed checks) is left alone (TC_ACT_OK) for the user-space path, which is
 * unchanged. Loaded by tunnel/fastpath.cc; design in docs/tunnel-fastpath.md.
 *
 *   host_tap_egress      host: frames the VM bridge sends out of a session's
 *                        TAP (guest -> home router) -> 6in6 to the HA
 *   host_uplink_ingress  host: 6in6 from the HA to the care-of address ->
 *                        Ethernet frame into the TAP's ingress (-> bridge -> guest)
 *   ha_link_ingress      HA: frames to a bound home address -> 6in6 to the
 *                        care-of address; 6in6 from a bound care-of address
 *                        whose inner source is the bound home address ->
 *                        inner packet routed out
 *   ha_link_filter       HA: socket filter for the home-link AF_PACKET socket;
 *                        drops exactly what ha_link_ingress will take, so user
 *                        space (which taps in before tc ingress) does not
 *                        forward it a second time
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath_abi.h"

/* Debian 12's uapi headers are from Linux 6.1; the flag came in 6.3. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define ETH_LEN 14
#define IP6_LEN 40
#define IP4_LEN 20 /* IPv4 without options: packets with options are user space's */
#define NH_IPV4 4  /* IPv4-in-IPv6 (RFC 2473, DSMIPv6 RFC 5555) */
#define NH_IPV6 41
#define NH_ICMPV6 58
#define NH_TCP 6
#define NH_HOPOPTS 0
#define OUTER_HOP_LIMIT 64
#define PACKET_HOST_TYPE 0

char LICENSE[] SEC("license") = "GPL";

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, 4096);
  __type(key, __u8[16]);
  __type(value, struct kgm_host_session);
} host_sessions SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __uint(max_entries, 1 << 20);
  __type(key, __u8[16]);
  __type(value, struct kgm_ha_binding);
} ha_bindings SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 1);
  __type(key, __u32);
  __type(value, struct kgm_ha_config);
} ha_config SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, KGM_COUNTER_COUNT);
  __type(key, __u32);
  __type(value, __u64);
} counters SEC(".maps");

/* The fixed IPv6 header as bytes (no bitfields: the same on every compiler). */
struct ip6 {
  __u8 vtc_flow[4];
  __be16 payload_len;
  __u8 nexthdr;
  __u8 hop_limit;
  __u8 saddr[16];
  __u8 daddr[16];
} __attribute__((aligned(8))); /* 8-aligned addresses: addr_eq reads them as two u64 */

/* The IPv4 header without options. */
struct ip4 {
  __u8 ver_ihl;
  __u8 tos;
  __be16 tot_len;
  __be16 id;
  __be16 frag_off;
  __u8 ttl;
  __u8 protocol;
  __u16 check;
  __u8 saddr[4];
  __u8 daddr[4];
} __attribute__((aligned(8)));

struct eth {
  __u8 dst[6];
  __u8 src[6];
  __be16 proto;
} __attribute__((aligned(8)));

static __always_inline void count(__u32 which, __u64 n) {
  __u64 *v = bpf_map_lookup_elem(&counters, &which);
  if (v) *v += n;
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b) {
  const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
  return x[0] == y[0] && x[1] == y[1];
}

/* MACs sit at 2-aligned offsets (6 in the Ethernet header): u16 loads. */
static __always_inline int mac_eq(const __u8 *a, const __u8 *b) {
  const __u16 *x = (const __u16 *)a, *y = (const __u16 *)b;
  return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

/* Never tunnelled: multicast (ff00::/8), link-local (fe80::/10), unspecified. */
static __always_inline int stays_on_link(const __u8 *a) {
  if (a[0] == 0xff) return 1;
  if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) return 1;
  const __u64 *x = (const __u64 *)a;
  return x[0] == 0 && x[1] == 0;
}

/* The map key of an IPv4 home address: the IPv4-mapped IPv6 address
 * ::ffff:a.b.c.d (never an IPv6 home address), so IPv4 shares the maps. */
static __always_inline void mapped4(__u8 *key, const __u8 *a) {
  __u64 *k = (__u64 *)key;
  k[0] = 0;
  k[1] = 0;
  key[10] = 0xff;
  key[11] = 0xff;
  __builtin_memcpy(key + 12, a, 4);
}

/* One's-complement sum of the 20-byte header, folded. */
static __always_inline __u16 ip4_sum(const struct ip4 *ip) {
  const __u16 *w = (const __u16 *)ip;
  __u32 sum = 0;
#pragma unroll
  for (int i = 0; i < IP4_LEN / 2; i++) sum += w[i];
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return (__u16)sum;
}

/* What the fast path takes of IPv4 (anything else stays user space's, as
 * before): version 4, no options, not a fragment, a correct header checksum
 * (user space drops a wrong one) and, for a plain skb, a Total Length equal
 * to what is there (no Ethernet padding to trim). */
static __always_inline int ip4_plain(struct __sk_buff *skb, const struct ip4 *ip, __u32 l3) {
  if (ip->ver_ihl != 0x45) return 0;
  if (ip->frag_off & bpf_htons(0x3fff)) return 0; /* MF or an offset */
  if (ip4_sum(ip) != 0xffff) return 0;
  if (!(skb->gso_segs > 1 || skb->gso_size) && bpf_ntohs(ip->tot_len) != skb->len - l3) return 0;
  return 1;
}

/* Never tunnelled: multicast, limited broadcast, 0/8, loopback. */
static __always_inline int stays_on_link4(const __u8 *a) {
  return (a[0] & 0xf0) == 0xe0 || a[0] == 0 || a[0] == 127 ||
         (a[0] == 255 && a[1] == 255 && a[2] == 255 && a[3] == 255);
}

/* Neighbor Discovery and router messages (RS, RA, NS, NA, Redirect). */
static __always_inline int is_nd(__u8 icmp_type) { return icmp_type >= 133 && icmp_type <= 137; }

/* Does an inner packet starting at `l3` (Ethernet stripped) fit `mtu` once
 * the GSO super-packet is cut into segments? For a plain skb, its length. */
static __always_inline int fits(struct __sk_buff *skb, __u32 l3, __u32 l3_len, __u8 nexthdr,
                                __u32 mtu) {
  if (skb->gso_segs > 1 || skb->gso_size) {
    if (nexthdr != NH_TCP) return 0; /* only TCP segmentation is judged here */
    __u8 off;
    if (bpf_skb_load_bytes(skb, l3 + l3_len + 12, &off, 1)) return 0;
    __u32 hdrs = l3_len + ((off >> 4) * 4);
    return skb->gso_size + hdrs <= mtu;
  }
  return skb->len - l3 <= mtu;
}

/* Writes the outer IPv6 header at offset ETH_LEN (room already made). */
static __always_inline int write_outer(struct __sk_buff *skb, const __u8 *src, const __u8 *dst,
                                       __u32 inner_len, __u8 nexthdr) {
  struct ip6 o;
  /* RFC 6437: a per-flow label, from the hash the stack already has (0 if
   * none: computing one here would run the flow dissector per packet). */
  __u32 flow = skb->hash & 0xfffff;
  o.vtc_flow[0] = 0x60;
  o.vtc_flow[1] = (flow >> 16) & 0x0f;
  o.vtc_flow[2] = (flow >> 8) & 0xff;
  o.vtc_flow[3] = flow & 0xff;
  o.payload_len = bpf_htons((__u16)inner_len);
  o.nexthdr = nexthdr;
  o.hop_limit = OUTER_HOP_LIMIT;
  __builtin_memcpy(o.saddr, src, 16);
  __builtin_memcpy(o.daddr, dst, 16);
  return bpf_skb_store_bytes(skb, ETH_LEN, &o, sizeof o, 0);
}

/* ---- host ------------------------------------------------------------------ */

/* Encapsulates the inner packet (Ethernet + IPv6 or IPv4 at ETH_LEN) of a
 * session and sends it to its HA. `nexthdr`: 41 (IPv6) or 4 (IPv4). */
static __always_inline int host_encap(struct __sk_buff *skb, struct kgm_host_session *s,
                                      __u8 nexthdr) {
  __u32 inner_len = skb->len - ETH_LEN;
  if (inner_len > 0xffff) return TC_ACT_OK;
  __u32 uplink = s->uplink_ifindex;
  /* Before adjust_room, which resets gso_segs of a GSO packet. */
  __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
  __u8 coa[16], ha[16];
  __builtin_memcpy(coa, s->coa, 16);
  __builtin_memcpy(ha, s->ha, 16);
  /* ENCAP_L3_IPV6 also sets skb->protocol to IPv6 for an IPv4 inner packet,
   * which is what bpf_redirect_neigh routes by. */
  if (bpf_skb_adjust_room(skb, IP6_LEN, BPF_ADJ_ROOM_MAC,
                          BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_FIXED_GSO) ||
      write_outer(skb, coa, ha, inner_len, nexthdr)) {
    count(KGM_HOST_ERRORS, 1);
    return TC_ACT_SHOT;
  }
  count(KGM_HOST_ENCAP_PACKETS, segs);
  count(KGM_HOST_ENCAP_BYTES, inner_len);
  /* Per map entry: an IPv4 home address's entry counts the IPv4 packets. */
  __sync_fetch_and_add(&s->encap_packets, segs);
  __sync_fetch_and_add(&s->encap_bytes, inner_len);
  /* Route to the HA and resolve the next hop's MAC on the uplink. */
  return bpf_redirect_neigh(uplink, 0, 0, 0);
}

/* The frame leaves by the session's own TAP, from its guest's MAC to its
 * router's: what user space checks, where each session reads only its own
 * TAP. Without the TAP check a guest elsewhere on this host that forges
 * another session's home address and MAC would be tunnelled from that
 * session's care-of address. */
static __always_inline int from_session_guest(const struct __sk_buff *skb,
                                              const struct kgm_host_session *s,
                                              const struct eth *e) {
  return skb->ifindex == s->tap_ifindex && mac_eq(e->src, s->guest_mac) &&
         mac_eq(e->dst, s->router_mac);
}

/* Guest IPv4 (DSMIPv6): IPv4-in-IPv6 to the HA. The host does not forward
 * it (no TTL change), as the user-space path. */
static __always_inline int host_tap_egress4(struct __sk_buff *skb, const struct eth *e) {
  struct ip4 ip;
  if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof ip)) return TC_ACT_OK;
  if (!ip4_plain(skb, &ip, ETH_LEN)) return TC_ACT_OK;
  __u8 key[16] __attribute__((aligned(8)));
  mapped4(key, ip.saddr);
  struct kgm_host_session *s = bpf_map_lookup_elem(&host_sessions, key);
  if (!s) return TC_ACT_OK;
  if (!from_session_guest(skb, s, e)) return TC_ACT_OK;
  if (stays_on_link4(ip.daddr)) return TC_ACT_OK;
  if (!fits(skb, ETH_LEN, IP4_LEN, ip.protocol, s->mtu)) {
    count(KGM_HOST_PASSED_TOO_BIG, 1); /* user space: fragmentation needed, or outer fragments */
    return TC_ACT_OK;
  }
  return host_encap(skb, s, NH_IPV4);
}

SEC("tc")
int host_tap_egress(struct __sk_buff *skb) {
  struct eth e;
  struct ip6 ip;
  if (bpf_skb_load_bytes(skb, 0, &e, ETH_LEN)) return TC_ACT_OK;
  if (e.proto == bpf_htons(ETH_P_IP)) return host_tap_egress4(skb, &e);
  if (e.proto != bpf_htons(ETH_P_IPV6)) return TC_ACT_OK;
  if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof ip)) return TC_ACT_OK;
  if ((ip.vtc_flow[0] >> 4) != 6) return TC_ACT_OK;
  struct kgm_host_session *s = bpf_map_lookup_elem(&host_sessions, ip.saddr);
  if (!s) return TC_ACT_OK;
  if (!from_session_guest(skb, s, &e)) return TC_ACT_OK;
  if (stays_on_link(ip.daddr)) return TC_ACT_OK;
  if (ip.nexthdr == NH_HOPOPTS) return TC_ACT_OK;
  if (ip.nexthdr == NH_ICMPV6) {
    __u8 type;
    if (bpf_skb_load_bytes(skb, ETH_LEN + IP6_LEN, &type, 1)) return TC_ACT_OK;
    if (is_nd(type)) return TC_ACT_OK;
  }
  if (!fits(skb, ETH_LEN, IP6_LEN, ip.nexthdr, s->mtu)) {
    count(KGM_HOST_PASSED_TOO_BIG, 1); /* user space sends Packet Too Big */
    return TC_ACT_OK;
  }
  return host_encap(skb, s, NH_IPV6);
}

SEC("tc")
int host_uplink_ingress(struct __sk_buff *skb) {
  struct eth e;
  struct ip6 outer;
  if (bpf_skb_load_bytes(skb, 0, &e, ETH_LEN)) return TC_ACT_OK;
  if (e.proto != bpf_htons(ETH_P_IPV6)) return TC_ACT_OK;
  if (bpf_skb_load_bytes(skb, ETH_LEN, &outer, sizeof outer)) return TC_ACT_OK;
  if ((outer.vtc_flow[0] >> 4) != 6) return TC_ACT_OK;
  struct kgm_host_session *s;
  __u16 proto;
  __u64 decap_flag;
  if (outer.nexthdr == NH_IPV6) {
    struct ip6 inner;
    if (bpf_skb_load_bytes(skb, ETH_LEN + IP6_LEN, &inner, sizeof inner)) return TC_ACT_OK;
    if ((inner.vtc_flow[0] >> 4) != 6) return TC_ACT_OK;
    s = bpf_map_lookup_elem(&host_sessions, inner.daddr);
    if (!s) return TC_ACT_OK;
    /* A Binding Refresh Request tunnelled to the home address is the session's. */
    if (inner.nexthdr == 135) return TC_ACT_OK;
    proto = ETH_P_IPV6;
    decap_flag = BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
  } else if (outer.nexthdr == NH_IPV4) {
    struct ip4 inner;
    if (bpf_skb_load_bytes(skb, ETH_LEN + IP6_LEN, &inner, sizeof inner)) return TC_ACT_OK;
    if (!ip4_plain(skb, &inner, ETH_LEN + IP6_LEN)) return TC_ACT_OK;
    __u8 key[16] __attribute__((aligned(8)));
    mapped4(key, inner.daddr);
    s = bpf_map_lookup_elem(&host_sessions, key);
    if (!s) return TC_ACT_OK;
    proto = ETH_P_IP;
    decap_flag = BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
  } else {
    return TC_ACT_OK;
  }
  if (!addr_eq(outer.saddr, s->ha) || !addr_eq(outer.daddr, s->coa)) return TC_ACT_OK;
  __u32 tap = s->tap_ifindex;
  struct eth ne;
  __builtin_memcpy(ne.dst, s->guest_mac, 6);
  __builtin_memcpy(ne.src, s->router_mac, 6);
  ne.proto = bpf_htons(proto);
  __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
  if (bpf_skb_adjust_room(skb, -IP6_LEN, BPF_ADJ_ROOM_MAC,
                          decap_flag | BPF_F_ADJ_ROOM_FIXED_GSO) ||
      bpf_skb_store_bytes(skb, 0, &ne, ETH_LEN, 0)) {
    count(KGM_HOST_ERRORS, 1);
    return TC_ACT_SHOT;
  }
  count(KGM_HOST_DECAP_PACKETS, segs);
  count(KGM_HOST_DECAP_BYTES, skb->len - ETH_LEN);
  __sync_fetch_and_add(&s->decap_packets, segs);
  __sync_fetch_and_add(&s->decap_bytes, skb->len - ETH_LEN);
  /* Into the TAP as if the daemon had written it: the bridge takes it to the guest. */
  return bpf_redirect(tap, BPF_F_INGRESS);
}

/* ---- home agent ------------------------------------------------------------ */

enum ha_action { HA_PASS = 0, HA_ENCAP, HA_DECAP };

struct ha_verdict {
  __u8 coa[16];     /* HA_ENCAP: the binding's care-of address */
  __u32 inner_len;  /* HA_ENCAP: the packet's length without Ethernet */
  __u32 ipv4;       /* the inner packet is IPv4 (DSMIPv6) */
};

/* The end of classifying a packet to a bound home address (binding `b`):
 * HA_ENCAP if it fits the tunnel. */
static __always_inline int ha_encap_verdict(struct __sk_buff *skb, struct kgm_ha_config *cfg,
                                            struct ha_verdict *v, struct kgm_ha_binding *b,
                                            __u32 l3_len, __u8 proto, int counting) {
  if (!fits(skb, ETH_LEN, l3_len, proto, cfg->mtu)) {
    if (counting) count(KGM_HA_PASSED_TOO_BIG, 1);
    return HA_PASS;
  }
  v->inner_len = skb->len - ETH_LEN;
  if (v->inner_len > 0xffff) return HA_PASS;
  __builtin_memcpy(v->coa, b->coa, 16);
  return HA_ENCAP;
}

/* IPv4 (DSMIPv6, RFC 5555) on the home link: 4in6 from a mobile node, or a
 * packet to a bound IPv4 home address (keyed ::ffff:a.b.c.d in ha_bindings). */
static __always_inline int ha_classify4(struct __sk_buff *skb, struct kgm_ha_config *cfg,
                                        struct ha_verdict *v, int counting, __u32 l3) {
  struct ip4 ip;
  __u8 key[16] __attribute__((aligned(8)));
  v->ipv4 = 1;
  if (bpf_skb_load_bytes(skb, l3, &ip, sizeof ip)) return HA_PASS;
  if (!ip4_plain(skb, &ip, l3) || ip.ttl <= 1) return HA_PASS;
  if (l3 != ETH_LEN) {
    /* From a mobile node (outer header checked by the caller). */
    struct ip6 outer;
    if (bpf_skb_load_bytes(skb, ETH_LEN, &outer, sizeof outer)) return HA_PASS;
    mapped4(key, ip.saddr);
    struct kgm_ha_binding *b = bpf_map_lookup_elem(&ha_bindings, key);
    if (!b || !addr_eq(b->coa, outer.saddr)) {
      if (counting) count(KGM_HA_PASSED_SPOOFED, 1);
      return HA_PASS;
    }
    if (stays_on_link4(ip.daddr)) return HA_PASS;
    mapped4(key, ip.daddr);
    if (bpf_map_lookup_elem(&ha_bindings, key)) return HA_PASS;
    return HA_DECAP;
  }
  if (skb->pkt_type != PACKET_HOST_TYPE) return HA_PASS;
  mapped4(key, ip.daddr);
  struct kgm_ha_binding *b = bpf_map_lookup_elem(&ha_bindings, key);
  if (!b) return HA_PASS;
  return ha_encap_verdict(skb, cfg, v, b, IP4_LEN, ip.protocol, counting);
}

/* What ha_link_ingress does with a frame arriving on the home link. Shared
 * with ha_link_filter, so user space skips exactly these. */
static __always_inline int ha_classify(struct __sk_buff *skb, struct kgm_ha_config *cfg,
                                       struct ha_verdict *v, int counting) {
  struct eth e;
  struct ip6 ip;
  if (bpf_skb_load_bytes(skb, 0, &e, ETH_LEN)) return HA_PASS;
  if (e.proto == bpf_htons(ETH_P_IP)) return ha_classify4(skb, cfg, v, counting, ETH_LEN);
  if (e.proto != bpf_htons(ETH_P_IPV6)) return HA_PASS;
  if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof ip)) return HA_PASS;
  if ((ip.vtc_flow[0] >> 4) != 6) return HA_PASS;
  if (ip.nexthdr == NH_IPV4 && addr_eq(ip.daddr, cfg->address))
    return ha_classify4(skb, cfg, v, counting, ETH_LEN + IP6_LEN);
  if (ip.nexthdr == NH_IPV6 && addr_eq(ip.daddr, cfg->address)) {
    /* From a mobile node: inner source must be bound to the outer source
     * (RFC 6275 §10.4.5), as in HomeAgent::HandleTunnelPacket. */
    struct ip6 in;
    if (bpf_skb_load_bytes(skb, ETH_LEN + IP6_LEN, &in, sizeof in)) return HA_PASS;
    if ((in.vtc_flow[0] >> 4) != 6 || in.hop_limit <= 1) return HA_PASS;
    struct kgm_ha_binding *b = bpf_map_lookup_elem(&ha_bindings, in.saddr);
    if (!b || !addr_eq(b->coa, ip.saddr)) {
      if (counting) count(KGM_HA_PASSED_SPOOFED, 1);
      return HA_PASS;
    }
    if (stays_on_link(in.daddr)) return HA_PASS;
    /* To another mobile node's home address: left to user space. */
    if (bpf_map_lookup_elem(&ha_bindings, in.daddr)) return HA_PASS;
    return HA_DECAP;
  }
  /* To a bound home address, sent to our MAC (the proxy ND answer). */
  if (skb->pkt_type != PACKET_HOST_TYPE) return HA_PASS;
  struct kgm_ha_binding *b = bpf_map_lookup_elem(&ha_bindings, ip.daddr);
  if (!b) return HA_PASS;
  if (ip.hop_limit <= 1 || ip.nexthdr == NH_HOPOPTS || ip.nexthdr == 135) return HA_PASS;
  if (ip.nexthdr == NH_ICMPV6) {
    __u8 type;
    if (bpf_skb_load_bytes(skb, ETH_LEN + IP6_LEN, &type, 1)) return HA_PASS;
    if (is_nd(type)) return HA_PASS; /* proxy ND is user space's */
  }
  return ha_encap_verdict(skb, cfg, v, b, IP6_LEN, ip.nexthdr, counting);
}

/* The HA forwards the inner packet: hop limit - 1, or TTL - 1 with the IPv4
 * header checksum computed again (as DecrementHopLimit in home_agent.cc;
 * classification already checked hop limit/TTL > 1 and the checksum). */
static __always_inline int forward_inner(struct __sk_buff *skb, __u32 l3, int ipv4) {
  if (ipv4) {
    struct ip4 ip;
    if (bpf_skb_load_bytes(skb, l3, &ip, sizeof ip)) return -1;
    ip.ttl -= 1;
    ip.check = 0;
    ip.check = (__u16)~ip4_sum(&ip);
    return bpf_skb_store_bytes(skb, l3, &ip, IP4_LEN, 0);
  }
  __u8 hl;
  if (bpf_skb_load_bytes(skb, l3 + 7, &hl, 1)) return -1;
  hl -= 1;
  return bpf_skb_store_bytes(skb, l3 + 7, &hl, 1, 0);
}

SEC("tc")
int ha_link_ingress(struct __sk_buff *skb) {
  __u32 zero = 0;
  struct kgm_ha_config *cfg = bpf_map_lookup_elem(&ha_config, &zero);
  if (!cfg || !cfg->enabled) return TC_ACT_OK;
  struct ha_verdict v = {};
  int action = ha_classify(skb, cfg, &v, 1);
  if (action == HA_PASS) return TC_ACT_OK;
  __u32 out = cfg->link_ifindex;
  __u8 ha[16];
  __builtin_memcpy(ha, cfg->address, 16);
  __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
  /* The inner packet: we forward it (both directions). */
  if (forward_inner(skb, action == HA_ENCAP ? ETH_LEN : ETH_LEN + IP6_LEN, v.ipv4)) goto error;
  if (action == HA_ENCAP) {
    if (bpf_skb_adjust_room(skb, IP6_LEN, BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_FIXED_GSO) ||
        write_outer(skb, ha, v.coa, v.inner_len, v.ipv4 ? NH_IPV4 : NH_IPV6))
      goto error;
    count(KGM_HA_ENCAP_PACKETS, segs);
    count(KGM_HA_ENCAP_BYTES, v.inner_len);
  } else {
    __u64 decap = v.ipv4 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4 : BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
    if (bpf_skb_adjust_room(skb, -IP6_LEN, BPF_ADJ_ROOM_MAC, decap | BPF_F_ADJ_ROOM_FIXED_GSO))
      goto error;
    count(KGM_HA_DECAP_PACKETS, segs);
    count(KGM_HA_DECAP_BYTES, skb->len - ETH_LEN);
  }
  /* Routed by destination (the kernel's routing table, with oif = the home
   * link); the next hop's MAC comes from the neighbour table. */
  return bpf_redirect_neigh(out, 0, 0, 0);
error:
  count(KGM_HA_ERRORS, 1);
  return TC_ACT_SHOT;
}

SEC("socket")
int ha_link_filter(struct __sk_buff *skb) {
  __u32 zero = 0;
  struct kgm_ha_config *cfg = bpf_map_lookup_elem(&ha_config, &zero);
  if (!cfg || !cfg->enabled) return skb->len;
  struct ha_verdict v = {};
  return ha_classify(skb, cfg, &v, 0) == HA_PASS ? skb->len : 0;
}
