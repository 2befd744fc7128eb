//! Flow sync source: with SETTINGS_F_FLOW_SYNC, every flow the datapath pins to a
//! backend is reported once on FLOW_EVENTS (what lbd streams to the peer balancer), on
//! its second packet, once it proves real; without it, nothing is reported. Flows synced
//! in from the peer and flows left unrecorded in flood mode are never reported. Root
//! (BPF_PROG_TEST_RUN).

use aya::maps::{Map, RingBuf};
use lb_common::{FlowEvent, FlowKey, PROTO_TCP, PROTO_UDP, SETTINGS_F_FLOW_SYNC, map_names};
use lb_tests::packets::{GW_MAC, L4, Tcp, v4};
use lb_tests::{Datapath, XDP_TX, backend, service, settings};
use lb_userspace::Mode;

fn events(rb: &mut RingBuf<aya::maps::MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        out.push(lb_userspace::flowsync::parse_event(&item).expect("a FlowEvent-sized record"));
    }
    out
}

#[test]
fn new_flows_are_reported_once_when_sync_is_on() {
    let mut dp = Datapath::load();
    let mut s = settings("10.0.0.5", "2001:db8::5", Some(GW_MAC), 1500);
    dp.control.set_settings(s).unwrap();
    dp.control.add_service(service("web", "10.0.0.100:80/tcp", Mode::Ipip, 251), vec![backend("10.1.0.11", 1, None)]).unwrap();
    dp.control.add_service(service("dns", "10.0.0.100:53/udp", Mode::Ipip, 251), vec![backend("10.1.0.21", 1, None)]).unwrap();
    let mut rb = match dp.ebpf.take_map(map_names::FLOW_EVENTS) {
        Some(m @ Map::RingBuf(_)) => RingBuf::try_from(m).unwrap(),
        _ => panic!("FLOW_EVENTS is not a ring buffer"),
    };
    let syn = v4("192.0.2.10", "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b"");
    assert_eq!(dp.run(&syn).0, XDP_TX);
    assert!(events(&mut rb).is_empty(), "sync off: no events");

    s.flags |= SETTINGS_F_FLOW_SYNC;
    dp.control.set_settings(s).unwrap();
    let syn2 = v4("192.0.2.10", "10.0.0.100", L4::Tcp(40001, 80, Tcp::Syn), b"");
    let ack2 = v4("192.0.2.10", "10.0.0.100", L4::Tcp(40001, 80, Tcp::Ack), b"data");
    let udp = v4("192.0.2.11", "10.0.0.100", L4::Udp(5353, 53), b"q");
    assert_eq!(dp.run(&syn2).0, XDP_TX);
    assert!(events(&mut rb).is_empty(), "a flow's first packet is not reported (a SYN flood costs sync nothing)");
    for f in [&ack2, &ack2, &udp, &udp] {
        assert_eq!(dp.run(f).0, XDP_TX);
    }
    let ev = events(&mut rb);
    let web_id = dp.control.backend_id("web", "10.1.0.11".parse().unwrap()).unwrap();
    let dns_id = dp.control.backend_id("dns", "10.1.0.21".parse().unwrap()).unwrap();
    let want = [
        FlowEvent {
            key: FlowKey::new("192.0.2.10".parse().unwrap(), 40001, "10.0.0.100".parse().unwrap(), 80, PROTO_TCP),
            backend_id: web_id,
            service_id: dp.control.service("web").unwrap().id,
        },
        FlowEvent {
            key: FlowKey::new("192.0.2.11".parse().unwrap(), 5353, "10.0.0.100".parse().unwrap(), 53, PROTO_UDP),
            backend_id: dns_id,
            service_id: dp.control.service("dns").unwrap().id,
        },
    ];
    assert_eq!(ev, want, "one event per flow, on its second packet, none after");

    // The flow recorded while sync was off is reported on its next packet.
    let ack1 = v4("192.0.2.10", "10.0.0.100", L4::Tcp(40000, 80, Tcp::Ack), b"x");
    assert_eq!(dp.run(&ack1).0, XDP_TX);
    let ev = events(&mut rb);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].key, FlowKey::new("192.0.2.10".parse().unwrap(), 40000, "10.0.0.100".parse().unwrap(), 80, PROTO_TCP));

    // A flow synced in from the peer (lbd writes its clock into created_ns) is never
    // reported back.
    let peer = FlowKey::new("192.0.2.12".parse().unwrap(), 40002, "10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
    dp.flows.insert(peer, lb_common::FlowValue { backend_id: web_id, _pad: 0, created_ns: 12345 }, 0).unwrap();
    let peer_ack = v4("192.0.2.12", "10.0.0.100", L4::Tcp(40002, 80, Tcp::Ack), b"x");
    for _ in 0..2 {
        assert_eq!(dp.run(&peer_ack).0, XDP_TX);
    }
    assert!(events(&mut rb).is_empty(), "a synced-in flow is not reported back");

    // Flood mode: an unrecorded flow is never reported. The thread is pinned so the
    // meter counted is this CPU's.
    // SAFETY: plain affinity syscall on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
    s.max_new_flows = 1;
    dp.control.set_settings(s).unwrap();
    for p in [41000u16, 41001, 41002] {
        for t in [Tcp::Syn, Tcp::Ack] {
            assert_eq!(dp.run(&v4("192.0.2.13", "10.0.0.100", L4::Tcp(p, 80, t), b"")).0, XDP_TX);
        }
    }
    // The first flow is within the limit (recorded, reported on its ACK); the others
    // are over it (steered unrecorded) and never reported.
    let ev = events(&mut rb);
    let first = FlowKey::new("192.0.2.13".parse().unwrap(), 41000, "10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
    assert_eq!(ev.iter().map(|e| e.key).collect::<Vec<_>>(), vec![first], "only the flow within the limit is reported");
}
