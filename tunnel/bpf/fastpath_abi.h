/* The fast path's maps as both sides see them: the eBPF programs in
 * fastpath.bpf.c (clang -target bpf) and the loader in tunnel/fastpath.cc
 * (g++). Plain C structs of fixed-size fields, no padding holes, so both
 * compilers lay them out the same way. See docs/tunnel-fastpath.md.
 */
#ifndef KAGEMUSHA_TUNNEL_FASTPATH_ABI_H
#define KAGEMUSHA_TUNNEL_FASTPATH_ABI_H

#include <linux/types.h>

/* host_sessions: home address (16 bytes, network order) -> session. One
 * entry per home address of every foreign-mode session of kagemusha-tunneld. */
struct kgm_host_session {
  __u8 coa[16];       /* outer source of what we send, outer destination of what we take */
  __u8 ha[16];        /* outer destination of what we send, outer source of what we take */
  __u32 tap_ifindex;  /* the session's TAP (decapsulated frames enter the bridge here) */
  __u32 uplink_ifindex; /* where encapsulated packets leave */
  __u32 mtu;          /* tunnel MTU: the largest inner packet */
  __u8 guest_mac[6];
  __u8 router_mac[6];
  /* Per-session counters, added to atomically by the programs. */
  __u64 encap_packets; /* guest -> HA (segments of a GSO packet count one each) */
  __u64 encap_bytes;   /* inner bytes */
  __u64 decap_packets; /* HA -> guest */
  __u64 decap_bytes;
};

/* ha_bindings: home address -> care-of address (kagemusha-ha's binding cache). */
struct kgm_ha_binding {
  __u8 coa[16];
};

/* ha_config[0]: the home agent's own parameters. */
struct kgm_ha_config {
  __u8 address[16];   /* the HA address: tunnel endpoint */
  __u32 link_ifindex; /* the home link */
  __u32 mtu;          /* the largest inner packet the HA encapsulates */
  __u32 enabled;      /* 0: every program passes everything (TC_ACT_OK / accept) */
  __u32 pad;
};

/* counters: per-CPU array of __u64, indexed by these. */
enum kgm_counter {
  KGM_HOST_ENCAP_PACKETS = 0, /* guest -> tunnel, carried by the fast path */
  KGM_HOST_ENCAP_BYTES,       /* inner bytes */
  KGM_HOST_DECAP_PACKETS,     /* tunnel -> guest */
  KGM_HOST_DECAP_BYTES,
  KGM_HOST_PASSED_TOO_BIG,    /* left to user space: larger than the tunnel MTU */
  KGM_HOST_ERRORS,            /* a helper failed; the packet was dropped */
  KGM_HA_ENCAP_PACKETS,       /* home link -> tunnel to a care-of address */
  KGM_HA_ENCAP_BYTES,
  KGM_HA_DECAP_PACKETS,       /* tunnel from a care-of address -> home link */
  KGM_HA_DECAP_BYTES,
  KGM_HA_PASSED_TOO_BIG,
  KGM_HA_PASSED_SPOOFED,      /* tunnel packet failing the binding check: user space counts it */
  KGM_HA_ERRORS,
  KGM_COUNTER_COUNT
};

#endif
