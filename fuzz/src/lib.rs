//! The fuzz targets as plain functions over bytes, so the libFuzzer binaries
//! (`fuzz_targets/`, nightly) and the corpus replay test (`tests/replay.rs`, stable) run
//! exactly the same code. Each target feeds untrusted input to the parser lbd uses for
//! it and checks what must hold for every input: no panic, and a round trip where the
//! format has one.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use lb_common::FlowKey;
use lb_userspace::api::{MAX_REQUEST, Request};
use lb_userspace::cluster::flow_sync::{LocalIds, Miss, from_flow_key, resolve};
use lb_userspace::cluster::wire::{self, Key, PeerGuard, Sealer};
use lb_userspace::config::Config;
use lb_userspace::control::Vip;
use sha2::Sha256;

/// A fuzz target: any bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `cargo xtask fuzz` and the replay test list them.
pub const TARGETS: &[(&str, Target)] =
    &[("config", config), ("api_request", api_request), ("peer_wire", peer_wire), ("flow_event", flow_event)];

/// The config file parser and validator (`lbd --config`, `lbd --check`, reload).
pub fn config(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(src) {
        Ok(cfg) => {
            let _ = cfg.describe();
            let _ = cfg.settings();
        }
        Err(errs) => assert!(!errs.0.is_empty(), "a refused config names at least one error"),
    }
}

/// The control socket's request decoder, as `daemon::read_request` applies it to one
/// line: what decodes must encode and decode to the same request.
pub fn api_request(data: &[u8]) {
    if data.len() > MAX_REQUEST {
        return;
    }
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let enc = serde_json::to_vec(&req).expect("a decoded request encodes");
    let again: Request = serde_json::from_slice(&enc).expect("an encoded request decodes");
    assert_eq!(again, req, "request round trip");
    if let Request::ServiceAdd { service } = &req {
        let _ = lb_userspace::core::validate_set(std::slice::from_ref(service));
    }
}

const SECRET: &[u8] = b"fuzz secret, not a real one";

/// The peer datagram decoder. Byte 0 picks the path: odd, the rest is a raw datagram
/// (as from the network: almost all fail the HMAC); even, byte 1 is the message kind
/// and the rest its payload, framed and authenticated here so the payload decoder is
/// reached. What opens must seal and open again to the same message.
pub fn peer_wire(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let key = Key::new(SECRET).expect("HMAC takes any key");
    let datagram = if sel & 1 == 1 {
        rest.to_vec()
    } else {
        let Some((&kind, payload)) = rest.split_first() else {
            return;
        };
        if payload.len() > wire::MAX_PAYLOAD {
            return;
        }
        frame(kind, payload)
    };
    let mut guard = PeerGuard::new(key.clone(), 1, Some(2));
    let opened = wire::open(&key, &datagram);
    let accepted = guard.accept(0, &datagram);
    let Ok((header, msg)) = opened else {
        assert!(accepted.is_err(), "the guard accepts only what opens");
        return;
    };
    let mut sealer = Sealer::new(key.clone(), header.node_id, header.epoch);
    // A message that decodes may still be one the sender never builds (a config chunk
    // larger than a datagram allows): then sealing refuses it, without panicking.
    if let Ok(again) = sealer.seal(&msg) {
        let (_, msg2) = wire::open(&key, &again).expect("a sealed message opens");
        assert_eq!(msg2, msg, "peer message round trip");
    }
}

/// A datagram with a valid header and tag around `payload`, as `Sealer` frames one.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(wire::HEADER_LEN + payload.len() + wire::TAG_LEN);
    d.extend_from_slice(&wire::MAGIC);
    d.push(wire::VERSION);
    d.push(kind);
    d.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    d.extend_from_slice(&2u32.to_be_bytes()); // node id
    d.extend_from_slice(&7u64.to_be_bytes()); // epoch
    d.extend_from_slice(&1u64.to_be_bytes()); // seq
    d.extend_from_slice(payload);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).expect("HMAC takes any key");
    mac.update(&d);
    d.extend_from_slice(&mac.finalize().into_bytes());
    d
}

/// One VIP with one backend, for resolving synced flows.
struct OneService {
    vip: Vip,
    backend: IpAddr,
}

impl LocalIds for OneService {
    fn has_service(&self, vip: Vip) -> bool {
        vip == self.vip
    }
    fn backend_id(&self, vip: Vip, backend: IpAddr) -> Option<u32> {
        (vip == self.vip && backend == self.backend).then_some(3)
    }
}

/// The FLOW_EVENTS record parser, then the active node's and the backup's handling of
/// the flow: to addresses and back must give the same flow key.
pub fn flow_event(data: &[u8]) {
    let Some(ev) = lb_userspace::flowsync::parse_event(data) else {
        assert_ne!(data.len(), size_of::<lb_common::FlowEvent>(), "a record of the right size parses");
        return;
    };
    let backend: IpAddr = if ev.backend_id & 1 == 0 { [10, 0, 1, 1].into() } else { "2001:db8::1".parse().unwrap() };
    let flow = from_flow_key(&ev.key, backend);
    let ids = OneService { vip: Vip { addr: flow.vip, port: flow.vip_port, proto: flow.proto }, backend };
    let (key, id) = resolve(&flow, &ids).expect("the flow's own VIP and backend resolve");
    assert_eq!(id, 3);
    let expect = FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, flow.proto);
    assert_eq!(key, expect);
    let other = OneService { vip: Vip { port: flow.vip_port.wrapping_add(1), ..ids.vip }, backend };
    if other.vip.port != 0 {
        assert_eq!(resolve(&flow, &other), Err(Miss::UnknownVip));
    }
}
