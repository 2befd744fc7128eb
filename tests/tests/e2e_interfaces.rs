//! lbd and its interfaces coming and going (root): one configured interface missing at
//! start (the others work; attached when it appears), and one deleted and recreated
//! (detached and shown so, attached again without a restart). Prefix `rti-`.

use std::process::Command;
use std::time::Duration;

use lb_tests::lbd::{Lbd, wait_for};
use lb_tests::netns::{ServerMode, TopoSpec, Topology, vip_v4};

const PREFIX: &str = "rti-";
const INSTANCE: &str = "rti";
/// A veth created in the balancer's namespace by the test, after lbd started.
const LATE: &str = "rtix0";

fn ip(ns: &str, args: &[&str]) {
    let out = Command::new("ip").arg("-n").arg(ns).args(args).output().expect("running ip");
    assert!(out.status.success(), "ip -n {ns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether an XDP program is attached to `dev` in `ns`.
fn has_xdp(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", "dev", dev]).output().expect("running ip");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("xdp")
}

fn state(l: &Lbd, dev: &str) -> String {
    let st = l.lbctl_json(&["status"]);
    st["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == dev).map(|i| i["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

/// Connections through the VIP still reach a backend.
fn served(t: &Topology, l: &Lbd, n: usize) {
    for i in 0..n {
        t.connect(vip_v4(1), 80).unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", l.log()));
    }
}

#[test]
fn missing_at_start_then_deleted_and_recreated() {
    let t = Topology::new(PREFIX, TopoSpec { lbs: 1, backends: 3 });
    t.add_vip_to_backends(vip_v4(1));
    t.start_servers(80, ServerMode::Echo);
    let mut l = Lbd::new(&t, 0, INSTANCE);
    let backends: String = t.backends.iter().map(|b| format!("[[service.backend]]\naddress = \"{}\"\n", b.v4)).collect();
    let header = l.config_header().replace(&format!("interfaces = [\"{}\"]", l.ifname), &format!("interfaces = [\"{}\", \"{LATE}\"]", l.ifname));
    std::fs::write(l.config_path(), format!("{header}\n[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 251\n{backends}", vip_v4(1)))
        .unwrap();
    l.start();

    // Missing at start: reported, the balancer runs on the other interface.
    assert_eq!(state(&l, LATE), "missing");
    assert_eq!(state(&l, &l.ifname), "attached");
    let (_, out, _) = l.lbctl(&["status"]);
    assert!(out.contains(&format!("{LATE} (missing)")), "{out}");
    assert!(wait_for(Duration::from_secs(10), || l.lbctl_json(&["status"])["backends_pending"] == 0).is_some(), "next hops resolved");
    served(&t, &l, 10);

    // It appears: attached without a restart.
    ip(&l.ns, &["link", "add", LATE, "type", "veth", "peer", "name", "rtix1"]);
    ip(&l.ns, &["link", "set", LATE, "up"]);
    ip(&l.ns, &["link", "set", "rtix1", "up"]);
    assert!(wait_for(Duration::from_secs(5), || state(&l, LATE) == "attached").is_some(), "attached when it appeared: {}", l.log());
    assert!(has_xdp(&l.ns, LATE), "XDP on {LATE}");

    // Deleted: shown as missing; the other interface keeps working.
    ip(&l.ns, &["link", "del", LATE]);
    assert!(wait_for(Duration::from_secs(5), || state(&l, LATE) == "missing").is_some(), "detached when deleted");
    served(&t, &l, 10);

    // Recreated (a new link, a new index): attached again, no restart, no reload.
    ip(&l.ns, &["link", "add", LATE, "type", "veth", "peer", "name", "rtix1"]);
    ip(&l.ns, &["link", "set", LATE, "up"]);
    assert!(wait_for(Duration::from_secs(5), || state(&l, LATE) == "attached").is_some(), "attached again: {}", l.log());
    assert!(has_xdp(&l.ns, LATE), "XDP on the recreated {LATE}");
    served(&t, &l, 10);
    let pid = l.lbctl_json(&["status"])["pid"].clone();
    assert!(pid.as_u64().is_some(), "the same lbd all along");
}
