//! Flow sync source: with SETTINGS_F_FLOW_SYNC, every flow the datapath pins to a
//! backend is reported once on FLOW_EVENTS (what lbd streams to the peer balancer);
//! without it, nothing is reported. Root (BPF_PROG_TEST_RUN).

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
    for f in [&syn2, &ack2, &ack2, &udp, &udp] {
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
    assert_eq!(ev, want, "one event per new flow, none for established packets");
}
