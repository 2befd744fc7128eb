//! `lbd decap attach/detach` on a real interface: native XDP on a veth this test
//! creates (and always deletes), pinned link and counters, clean detach.

use std::process::Command;

use aya::programs::XdpMode;
use lb_userspace::decap;

const IF_A: &str = "lbt-dcp0";
const IF_B: &str = "lbt-dcp1";

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

/// Deletes the veth pair and any pins even when the test panics.
struct Cleanup;
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = decap::detach(IF_A);
        let _ = std::fs::remove_dir_all(decap::pin_dir(IF_A));
        let _ = ip(&["link", "del", IF_A]);
    }
}

#[test]
fn attach_pins_and_detach_removes() {
    lb_tests::require_root();
    let _cleanup = Cleanup;
    let _ = ip(&["link", "del", IF_A]);
    let out = ip(&["link", "add", IF_A, "type", "veth", "peer", "name", IF_B]);
    assert!(out.status.success(), "ip link add: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ip(&["link", "set", IF_A, "up"]).status.success());
    assert!(ip(&["link", "set", IF_B, "up"]).status.success());

    decap::attach(IF_A, XdpMode::Driver).expect("attach in native mode");
    let show = String::from_utf8_lossy(&ip(&["link", "show", IF_A]).stdout).into_owned();
    assert!(show.contains("xdp"), "program attached in driver mode: {show}");
    assert!(decap::pin_dir(IF_A).join("link").exists());
    let err = decap::attach(IF_A, XdpMode::Driver).unwrap_err().to_string();
    assert!(err.contains("already attached"), "{err}");
    let stats = decap::stats(IF_A).expect("stats from the pinned map");
    assert_eq!(stats.len(), lb_common::decap_reason::COUNT as usize);

    decap::detach(IF_A).expect("detach");
    let show = String::from_utf8_lossy(&ip(&["link", "show", IF_A]).stdout).into_owned();
    assert!(!show.contains("xdp"), "program detached: {show}");
    assert!(!decap::pin_dir(IF_A).exists(), "pins removed");
    let err = decap::detach(IF_A).unwrap_err().to_string();
    assert!(err.contains("not attached"), "{err}");
    assert!(decap::attach("bad/name", XdpMode::Driver).unwrap_err().to_string().contains("bad interface name"));
}
