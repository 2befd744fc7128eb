//! Two lbd nodes as a cluster on a `netns::Topology` with two balancer nodes: the
//! client reaches the VIP on-link, so it goes to whichever node holds it. Shared by
//! the cluster tests and `cargo xtask bench failover`.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use serde_json::Value;

use crate::lbd::{Lbd, wait_for};
use crate::netns::{ServerMode, TopoSpec, Topology, vip_v4};

pub const PORT: u16 = 7946;
pub const SECRET: &[u8] = b"a shared secret of the two lbd nodes\n";

pub struct Pair {
    pub t: Topology,
    pub n: [Lbd; 2],
}

pub fn web() -> IpAddr {
    vip_v4(1)
}

pub fn backends_toml(t: &Topology, which: &[usize]) -> String {
    which.iter().map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[*i].v4)).collect()
}

/// Both nodes configured with `backends` of web, node 1 preferred (priority 200).
pub fn pair(prefix: &str, backends: &[usize]) -> Pair {
    let t = Topology::new(prefix, TopoSpec { lbs: 2, backends: 3 });
    t.add_vip_to_backends(web());
    t.start_servers(80, ServerMode::Echo);
    t.set_client_route_onlink();
    let n = [Lbd::new(&t, 0, &format!("{prefix}n1")), Lbd::new(&t, 1, &format!("{prefix}n2"))];
    for (i, l) in n.iter().enumerate() {
        let secret = l.dir.join("cluster.key");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (me, other) = (&t.lbs[i], &t.lbs[1 - i]);
        l.write_config(&format!(
            "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n{}\n[cluster]\nnode_id = {}\npriority = {}\n\
             listen = \"{}:{PORT}\"\npeer = \"{}:{PORT}\"\nsecret_file = \"{}\"\nheartbeat_ms = 100\ndead_after = 3\n",
            web(),
            backends_toml(&t, backends),
            i + 1,
            if i == 0 { 200 } else { 100 },
            me.v4,
            other.v4,
            secret.display()
        ));
    }
    Pair { t, n }
}

pub fn cluster(l: &Lbd) -> Value {
    l.lbctl_json(&["cluster", "status"])
}

pub fn role(l: &Lbd) -> String {
    cluster(l)["role"].as_str().unwrap_or("?").to_string()
}

pub fn wait_roles(p: &Pair, want: [&str; 2], max: Duration) -> Duration {
    wait_for(max, || role(&p.n[0]) == want[0] && role(&p.n[1]) == want[1])
        .unwrap_or_else(|| panic!("roles {want:?} not reached: {} / {}\n{}\n{}", cluster(&p.n[0]), cluster(&p.n[1]), p.n[0].log(), p.n[1].log()))
}

