//! Two lbd nodes as a cluster, end to end: a client, two balancer nodes and backends on
//! one bridge (tests/src/netns.rs). The client reaches the VIP on-link, so it goes to
//! whichever node holds it (the active one, which announces it by gratuitous ARP).
//! Root; one test at a time.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_tests::lbd::{Lbd, wait_for};
use lb_tests::netns::{Conn, Topology, in_ns};
use lb_tests::pair::{PORT, SECRET, cluster, pair, role, wait_roles, web};
use lb_userspace::cluster::config_sync::ConfigPos;
use lb_userspace::cluster::wire::{Heartbeat, Key, Message, Role, Sealer};

/// The MAC the client uses for the VIP (whoever answered ARP or announced last).
fn client_neighbour(t: &Topology) -> String {
    let out = std::process::Command::new("ip").args(["-n", &t.client.ns, "neigh", "show", &web().to_string()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn streams(t: &Topology, n: usize) -> Vec<Conn> {
    (0..n).map(|i| t.connect(web(), 80).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect()
}

fn echo_all(s: &mut [Conn], tag: &str) {
    for (i, c) in s.iter_mut().enumerate() {
        c.echo(&format!("{tag}-{i}")).unwrap_or_else(|e| panic!("stream {i} on {} ({tag}): {e}", c.backend));
    }
}

#[test]
fn active_killed_backup_takes_over_and_synced_flows_keep_their_backends() {
    let mut p = pair("lbca-", &[0, 1]);
    p.n[0].start();
    p.n[1].start();
    wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
    let mac1 = lb_tests::netns::mac_str(&p.t.lbs[0].mac);
    let mac2 = lb_tests::netns::mac_str(&p.t.lbs[1].mac);
    // First contact resolves the VIP through ARP: only the active node answers.
    drop(p.t.connect(web(), 80).expect("first connection"));
    assert!(client_neighbour(&p.t).contains(&mac1), "VIP on the active node: {}", client_neighbour(&p.t));

    let mut s = streams(&p.t, 16);
    echo_all(&mut s, "before");
    // A backend set change on the backup: replicated to the active. It moves some
    // flows' Maglev pick, so only flow sync keeps those streams on their backend.
    let (ok, _, err) = p.n[1].lbctl(&["backend", "add", "web", &p.t.backends[2].v4.to_string()]);
    assert!(ok, "{err}");
    let n3 = |l: &Lbd| l.lbctl_json(&["backend", "list", "web"]).as_array().unwrap().len();
    assert!(wait_for(Duration::from_secs(3), || n3(&p.n[0]) == 3).is_some(), "replicated to the active");
    echo_all(&mut s, "after-change");
    let applied = || cluster(&p.n[1])["flows_applied"].as_u64().unwrap();
    assert!(wait_for(Duration::from_secs(3), || applied() >= 16).is_some(), "flows synced to the backup: {}", cluster(&p.n[1]));

    // The active node dies: lbd killed and its interface gone with it (no more
    // heartbeats, no more forwarding).
    let t0 = Instant::now();
    p.n[0].kill();
    let _ = std::process::Command::new("ip").args(["-n", &p.t.lbs[0].ns, "link", "set", &p.t.lbs[0].ifname, "down"]).status();
    let took = wait_for(Duration::from_secs(3), || role(&p.n[1]) == "active").expect("backup takes over");
    assert!(took < Duration::from_millis(1000), "takeover after {took:?} (3 heartbeats of 100 ms + one tick)");
    assert!(wait_for(Duration::from_secs(2), || client_neighbour(&p.t).contains(&mac2)).is_some(), "GARP moved the VIP: {}", client_neighbour(&p.t));
    // Every stream survives, data both ways, on its original backend.
    echo_all(&mut s, "after-failover");
    let gap = t0.elapsed();
    drop(p.t.connect(web(), 80).expect("new connections after the takeover"));
    // The role flips first, the VIP bookkeeping follows within the same transition.
    let holds = || cluster(&p.n[1])["vips_held"].as_array().unwrap().iter().any(|v| v == &web().to_string());
    assert!(wait_for(Duration::from_secs(1), holds).is_some(), "{}\n{}", cluster(&p.n[1]), p.n[1].log());
    eprintln!("takeover {took:?}, streams back within {gap:?}");

    // The failed node returns: it catches up on the config and, preempt off, stays backup.
    let _ = std::process::Command::new("ip").args(["-n", &p.t.lbs[0].ns, "link", "set", &p.t.lbs[0].ifname, "up"]).status();
    p.n[0].start();
    wait_roles(&p, ["backup", "active"], Duration::from_secs(5));
    assert_eq!(n3(&p.n[0]), 3);
    assert_eq!(cluster(&p.n[0])["config"], cluster(&p.n[1])["config"], "same config position");
    assert!(cluster(&p.n[0])["vips_held"].as_array().unwrap().is_empty(), "a backup holds no VIP");
    let (ok, status, _) = p.n[0].lbctl(&["status"]);
    assert!(ok && status.contains("cluster      node 1 backup") && status.contains("peer node 2 active (alive)"), "{status}");
    echo_all(&mut s, "after-return");
}

#[test]
fn forged_replayed_and_truncated_datagrams_change_nothing() {
    let mut p = pair("lbcb-", &[0, 1, 2]);
    p.n[0].start();
    p.n[1].start();
    wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
    let target = std::net::SocketAddr::new(IpAddr::V4(p.t.lbs[1].v4), PORT);
    let hb = Heartbeat {
        priority: 255,
        role: Role::Active,
        preempt: true,
        config: ConfigPos { version: 1_000_000, origin: 1 },
        synced: true,
        yielding: false,
    };
    let sent = in_ns(&p.t.client.ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // Forged: the right format, the wrong key.
        let mut forger = Sealer::new(Key::new(b"not the shared secret at all").unwrap(), 1, u64::MAX / 2);
        let forged = forger.seal(&Message::Heartbeat(hb)).unwrap();
        // Replayed: the right key, sealed outside node 2's current session (it cannot
        // echo node 2's session nonce), as anything recorded earlier would be.
        let mut old = Sealer::new(Key::new(SECRET.trim_ascii_end()).unwrap(), 1, 1);
        let replayed = old.seal(&Message::Heartbeat(hb)).unwrap();
        let mut n = 0;
        for _ in 0..20 {
            for d in [&forged[..], &replayed[..], &forged[..10], b"garbage".as_slice(), &[0u8; 2000][..]] {
                n += sock.send_to(d, target).is_ok() as usize;
            }
        }
        n
    });
    assert_eq!(sent, 100);
    std::thread::sleep(Duration::from_millis(500));
    let st = cluster(&p.n[1]);
    assert_eq!(st["role"], "backup", "nothing changed: {st}");
    let rejected: u64 = st["datagrams_rejected"].as_array().unwrap().iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert!(rejected >= 100, "every bad datagram counted: {st}");
    let reasons: Vec<&str> = st["datagrams_rejected"].as_array().unwrap().iter().map(|r| r[0].as_str().unwrap()).collect();
    for want in ["bad_tag", "stale_session", "truncated"] {
        assert!(reasons.contains(&want), "{want} counted: {st}");
    }
    assert_eq!(role(&p.n[0]), "active");
    assert!(st["peer"]["alive"].as_bool().unwrap(), "the real peer is still heard");
}

/// Cuts (or restores) node `from`'s path to node `to`: a blackhole route to its address.
fn partition(t: &Topology, from: usize, to: usize, on: bool) {
    let dst = format!("{}/32", t.lbs[to].v4);
    let verb = if on { "add" } else { "del" };
    let st = std::process::Command::new("ip").args(["-n", &t.lbs[from].ns, "route", verb, "blackhole", &dst]).status().unwrap();
    assert!(st.success(), "ip route {verb} blackhole {dst}");
}

#[test]
fn partition_heals_to_one_active_and_failover_hands_over() {
    let mut p = pair("lbcc-", &[0, 1, 2]);
    p.n[0].start();
    p.n[1].start();
    wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
    // Partition both ways: each hears nothing, both become active.
    partition(&p.t, 0, 1, true);
    partition(&p.t, 1, 0, true);
    wait_roles(&p, ["active", "active"], Duration::from_secs(3));
    // Heal: within a heartbeat of hearing each other, one active (the preferred).
    partition(&p.t, 0, 1, false);
    partition(&p.t, 1, 0, false);
    let healed = wait_roles(&p, ["active", "backup"], Duration::from_secs(3));
    assert!(healed < Duration::from_millis(600), "split brain resolved after {healed:?}");
    assert!(cluster(&p.n[1])["vips_held"].as_array().unwrap().is_empty());

    // Maintenance: hand the active role over on purpose, streams keep working.
    let mut s = streams(&p.t, 8);
    let (ok, err) = {
        let (ok, _, err) = p.n[1].lbctl(&["cluster", "failover"]);
        (ok, err)
    };
    assert!(!ok && err.contains("not active"), "failover runs on the active node: {err}");
    let (ok, _, err) = p.n[0].lbctl(&["cluster", "failover"]);
    assert!(ok, "{err}\n{}\n{}\n{}\n{}", cluster(&p.n[0]), cluster(&p.n[1]), p.n[0].log(), p.n[1].log());
    wait_roles(&p, ["backup", "active"], Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(role(&p.n[0]), "backup", "the node that handed over does not take it back");
    echo_all(&mut s, "after-handover");
}

/// The two failures of the issue, separately: lbd killed alone (its pinned datapath
/// still forwards what reaches it), and the active's interface deleted while its lbd
/// runs. Either way the backup takes over and established streams keep working.
#[test]
fn kill_alone_and_interface_deletion_alone_both_fail_over() {
    for case in ["kill", "delete-link"] {
        let mut p = pair("lbcd-", &[0, 1, 2]);
        p.n[0].start();
        p.n[1].start();
        wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
        let mut s = streams(&p.t, 8);
        echo_all(&mut s, "before");
        let applied = || cluster(&p.n[1])["flows_applied"].as_u64().unwrap();
        assert!(wait_for(Duration::from_secs(3), || applied() >= 8).is_some(), "{case}: flows synced");
        let lb = &p.t.lbs[0];
        match case {
            "kill" => p.n[0].kill(),
            _ => {
                let st = std::process::Command::new("ip").args(["-n", &lb.ns, "link", "del", &lb.ifname]).status().unwrap();
                assert!(st.success());
            }
        }
        let took = wait_for(Duration::from_secs(3), || role(&p.n[1]) == "active").unwrap_or_else(|| panic!("{case}: no takeover"));
        assert!(took < Duration::from_millis(1000), "{case}: takeover after {took:?}");
        let mac2 = lb_tests::netns::mac_str(&p.t.lbs[1].mac);
        assert!(wait_for(Duration::from_secs(2), || client_neighbour(&p.t).contains(&mac2)).is_some(), "{case}: VIP announced by node 2");
        echo_all(&mut s, case);
        drop(p.t.connect(web(), 80).unwrap_or_else(|e| panic!("{case}: new connection: {e}")));
    }
}

/// Node 1's cluster datagrams as they reach node 2 (UDP payloads), captured for
/// `secs` seconds inside node 2's namespace with a packet socket.
fn capture_from(ns: &str, from: std::net::Ipv4Addr, secs: u64) -> Vec<Vec<u8>> {
    in_ns(ns, move || {
        // SAFETY: a packet socket owned here and closed below; reads into our buffer.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, (libc::ETH_P_IP as u16).to_be() as i32) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: setting a timeval option on our socket.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as u32) };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            // SAFETY: recv into a buffer of buf.len() bytes.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let Ok(ip) = etherparse::SlicedPacket::from_ip(&buf[..n]) else { continue };
            let (Some(etherparse::NetSlice::Ipv4(v4)), Some(etherparse::TransportSlice::Udp(udp))) = (&ip.net, &ip.transport) else { continue };
            if v4.header().source_addr() == from && udp.destination_port() == PORT {
                out.push(udp.payload().to_vec());
            }
        }
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
        out
    })
}

/// Issue 11 item 1 end to end: node 1's "active" heartbeats captured on the wire, node
/// 1 dead, node 2 restarted while the capture is replayed to it. Nothing recorded in
/// the earlier session is accepted, so node 2 takes the VIPs as if alone. (Before
/// session nonces, the restarted node accepted the replays and stayed backup with no
/// VIP while its peer was dead.)
#[test]
fn hd_replays_of_an_earlier_session_are_refused_after_restarts() {
    let mut p = pair("hd-a-", &[0, 1]);
    p.n[0].start();
    p.n[1].start();
    wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
    let captured = capture_from(&p.t.lbs[1].ns, p.t.lbs[0].v4, 2);
    assert!(captured.len() >= 15, "captured {} datagrams", captured.len());
    p.n[0].kill();
    p.n[1].kill();
    let target = std::net::SocketAddr::new(IpAddr::V4(p.t.lbs[1].v4), PORT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replayer = {
        let (ns, stop) = (p.t.client.ns.clone(), stop.clone());
        std::thread::spawn(move || {
            in_ns(&ns, move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let mut sent = 0u64;
                // Bounded: at most 20 s of replays, one every 10 ms.
                for d in captured.iter().cycle().take(2000) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    sent += sock.send_to(d, target).is_ok() as u64;
                    std::thread::sleep(Duration::from_millis(10));
                }
                sent
            })
        })
    };
    p.n[1].start();
    let took = wait_for(Duration::from_secs(3), || role(&p.n[1]) == "active");
    let st = cluster(&p.n[1]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = replayer.join().unwrap();
    assert!(took.is_some(), "node 2 stayed {} under {sent} replayed datagrams: {st}\n{}", role(&p.n[1]), p.n[1].log());
    assert_eq!(st["datagrams_accepted"], 0, "nothing of the earlier session accepted: {st}");
    let stale: u64 = st["datagrams_rejected"].as_array().unwrap().iter().filter(|r| r[0] == "stale_session").map(|r| r[1].as_u64().unwrap()).sum();
    assert!(stale >= 20, "replays refused as stale_session: {st}");
    let holds = || !cluster(&p.n[1])["vips_held"].as_array().unwrap().is_empty();
    assert!(wait_for(Duration::from_secs(2), holds).is_some(), "node 2 holds the VIP: {}", cluster(&p.n[1]));
}

/// IPv6 VIPs in a cluster (issue: every IPv6 backend went down and the service reset
/// every SYN). The active node holds each VIP as a /128 on its interface; one VIP here
/// sits in the nodes' own /64, numerically next to the backends (fd00:200::10 beside
/// ::11–::13), so by longest-prefix source selection the kernel would pick it as the
/// source of health checks, and the backends (which hold the VIP on `lo`) would answer
/// themselves. Health checks must keep passing on the active node, and connections
/// through both VIPs (dsr-l2 and IP6IP6) must succeed.
#[test]
fn ipv6_vips_keep_their_backends_up_and_connect_in_both_modes() {
    use lb_tests::netns::{ServerMode, TopoSpec, vip_v6};
    let prefix = "lbc6-";
    let t = Topology::new(prefix, TopoSpec { lbs: 2, backends: 3 });
    let near: IpAddr = "fd00:200::10".parse().unwrap();
    let far = vip_v6(2);
    t.add_vip_to_backends(near);
    t.add_vip_to_backends(far);
    t.start_servers(80, ServerMode::Echo);
    t.set_client_route_onlink();
    let mut n = [Lbd::new(&t, 0, &format!("{prefix}n1")), Lbd::new(&t, 1, &format!("{prefix}n2"))];
    let backends: String = (0..3).map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[i].v6)).collect();
    let health = "health = { kind = \"tcp\", interval_ms = 200, timeout_ms = 150, rise = 1, fall = 2 }\n";
    for (i, l) in n.iter().enumerate() {
        let secret = l.dir.join("cluster.key");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let (me, other) = (&t.lbs[i], &t.lbs[1 - i]);
        l.write_config(&format!(
            "[[service]]\nname = \"l2\"\nvip = \"[{near}]:80/tcp\"\nmode = \"dsr-l2\"\ntable_size = 1009\n{health}{backends}\n\
             [[service]]\nname = \"tun\"\nvip = \"[{far}]:80/tcp\"\nmode = \"ipip\"\ntable_size = 1009\n{health}{backends}\n\
             [cluster]\nnode_id = {}\npriority = {}\nlisten = \"{}:{PORT}\"\npeer = \"{}:{PORT}\"\nsecret_file = \"{}\"\n\
             heartbeat_ms = 100\ndead_after = 3\n",
            i + 1,
            if i == 0 { 200 } else { 100 },
            me.v4,
            other.v4,
            secret.display()
        ));
    }
    n[0].start();
    n[1].start();
    let p = lb_tests::pair::Pair { t, n };
    wait_roles(&p, ["active", "backup"], Duration::from_secs(5));
    let (t, active) = (&p.t, &p.n[0]);
    let all_up = || {
        active.lbctl_json(&["backend", "list"]).as_array().unwrap().iter().all(|b| b["health"] == "up" && b["in_table"] == true)
    };
    assert!(wait_for(Duration::from_secs(10), all_up).is_some(), "every IPv6 backend up: {}", active.lbctl(&["backend", "list"]).1);
    // The active holds both VIPs now; checks keep passing for ten more rounds.
    std::thread::sleep(Duration::from_secs(2));
    let list = active.lbctl_json(&["backend", "list"]);
    for b in list.as_array().unwrap() {
        assert!(b["health"] == "up" && b["last_check_error"].is_null(), "IPv6 backend still passes its checks with the VIPs held: {b}");
    }
    for vip in [near, far] {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..24 {
            let mut c = t.connect(vip, 80).unwrap_or_else(|e| panic!("connection {i} to [{vip}]:80: {e}\n{}", active.log()));
            c.echo(&format!("v6-{i}")).unwrap_or_else(|e| panic!("echo {i} through [{vip}]:80 on {}: {e}", c.backend));
            seen.insert(c.backend.clone());
        }
        assert_eq!(seen.len(), 3, "connections through [{vip}] spread over the three backends: {seen:?}");
    }
}
