//! `lbd decap attach/refresh/stats/detach` on a real interface, through the lbd binary:
//! native XDP on a veth in a namespace this test creates (and always deletes), pinned
//! link, counters and address sets, clean detach. Run under the root test lock.

use std::process::{Command, Output};

use lb_tests::lbd::bin;
use lb_tests::netns::{in_ns, ns_command};
use lb_userspace::decap;

const NS: &str = "tl-dcp";
const IF_A: &str = "tl-dcp0";
const IF_B: &str = "tl-dcp1";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

/// lbd in the test's namespace through `nsenter --net` (not `ip netns exec`, whose
/// private mount namespace would hold the pins only while lbd runs).
fn lbd(args: &[&str]) -> (i32, String, String) {
    let o = ns_command(NS, bin("lbd").to_str().unwrap()).args(args).output().expect("run lbd");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Detaches, removes the pins and the namespace (with its veth) even when the test panics.
struct Cleanup;
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = decap::detach(IF_A);
        let _ = std::fs::remove_dir_all(decap::pin_dir(IF_A));
        let _ = ip(&["netns", "del", NS]);
    }
}

#[test]
fn attach_filters_refreshes_and_detach_removes() {
    lb_tests::require_root();
    drop(Cleanup);
    let _cleanup = Cleanup;
    assert!(ip(&["netns", "add", NS]).status.success());
    let out = ip(&["-n", NS, "link", "add", IF_A, "type", "veth", "peer", "name", IF_B]);
    assert!(out.status.success(), "ip link add: {}", String::from_utf8_lossy(&out.stderr));
    for args in [
        &["-n", NS, "link", "set", IF_A, "up"][..],
        &["-n", NS, "link", "set", IF_B, "up"],
        &["-n", NS, "addr", "add", "10.9.0.2/24", "dev", IF_A],
        &["-n", NS, "-6", "addr", "add", "2001:db8:9::2/64", "dev", IF_A, "nodad"],
    ] {
        assert!(ip(args).status.success(), "ip {args:?}");
    }
    let balancers = std::env::temp_dir().join("tl-dcp-balancers");
    std::fs::write(&balancers, "# the lbd pair\n10.9.0.5, 10.9.0.6\n2001:db8:9::5   # v6 encap source\n").unwrap();

    // No balancer given: refused as a usage error, nothing attached.
    let (code, _, err) = lbd(&["decap", "attach", "--interface", IF_A]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow"), "{err}");
    assert!(!decap::pin_dir(IF_A).exists());
    let (code, _, err) = lbd(&["decap", "attach", "--interface", IF_A, "--allow", "10.9.0.5,banana"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"banana\" is not an IP address"), "{err}");
    assert!(!decap::pin_dir(IF_A).exists(), "a bad list attaches nothing");

    let (code, out, err) = lbd(&["decap", "attach", "--interface", IF_A, "--allow-file", balancers.to_str().unwrap()]);
    assert_eq!(code, 0, "attach: {out}{err}");
    let show = String::from_utf8_lossy(&ip(&["-n", NS, "link", "show", IF_A]).stdout).into_owned();
    assert!(show.contains("xdp"), "program attached in driver mode: {show}");
    assert!(decap::pin_dir(IF_A).join("link").exists());
    let (code, _, err) = lbd(&["decap", "attach", "--interface", IF_A, "--allow", "10.9.0.5"]);
    assert_ne!(code, 0);
    assert!(err.contains("already attached"), "{err}");

    let (allow, local) = decap::filter(IF_A).expect("address sets from the pins");
    let s = |v: &[std::net::IpAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(s(&allow), ["10.9.0.5", "10.9.0.6", "2001:db8:9::5"]);
    assert!(local.contains(&"10.9.0.2".parse().unwrap()) && local.contains(&"2001:db8:9::2".parse().unwrap()), "{local:?}");
    assert!(local.iter().all(|a| !a.is_loopback()), "{local:?}");
    let (code, out, _) = lbd(&["decap", "stats", "--interface", IF_A]);
    assert_eq!(code, 0);
    assert!(out.contains("drop_source_not_allowed") && out.contains("drop_not_local"), "{out}");
    assert!(out.contains("allowed balancers        10.9.0.5, 10.9.0.6, 2001:db8:9::5"), "{out}");

    // An address added later is local only after a refresh; --allow replaces the list.
    assert!(ip(&["-n", NS, "addr", "add", "10.9.1.2/24", "dev", IF_A]).status.success());
    assert!(!decap::filter(IF_A).unwrap().1.contains(&"10.9.1.2".parse().unwrap()));
    let (code, out, err) = lbd(&["decap", "refresh", "--interface", IF_A, "--allow", "10.9.0.7"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 balancer(s) allowed"), "{out}");
    let (allow, local) = in_ns(NS, || decap::filter(IF_A)).unwrap();
    assert_eq!(s(&allow), ["10.9.0.7"]);
    assert!(local.contains(&"10.9.1.2".parse().unwrap()), "{local:?}");

    let (code, _, err) = lbd(&["decap", "detach", "--interface", IF_A]);
    assert_eq!(code, 0, "{err}");
    let show = String::from_utf8_lossy(&ip(&["-n", NS, "link", "show", IF_A]).stdout).into_owned();
    assert!(!show.contains("xdp"), "program detached: {show}");
    assert!(!decap::pin_dir(IF_A).exists(), "pins removed");
    let err = decap::detach(IF_A).unwrap_err().to_string();
    assert!(err.contains("not attached"), "{err}");
    assert!(decap::refresh(IF_A, None).is_err(), "refresh needs an attached program");
    let a = ["10.9.0.5".parse().unwrap()];
    assert!(decap::attach("bad/name", aya::programs::XdpMode::Driver, &a).unwrap_err().to_string().contains("bad interface name"));
    let _ = std::fs::remove_file(balancers);
}

#[test]
fn allow_list_parsing() {
    let dir = std::env::temp_dir().join("tl-dcp-parse");
    std::fs::write(&dir, "10.0.0.5\n\n# comment\n::ffff:10.0.0.6, 2001:db8::5\n").unwrap();
    let got = decap::parse_allow(&["10.0.0.5,10.0.0.7".into()], Some(&dir)).unwrap();
    let s: Vec<String> = got.iter().map(|a| a.to_string()).collect();
    // Deduplicated, IPv4-mapped written as IPv4, sorted.
    assert_eq!(s, ["10.0.0.5", "10.0.0.6", "10.0.0.7", "2001:db8::5"]);
    assert!(decap::parse_allow(&[], None).unwrap_err().to_string().contains("no balancer address"));
    assert!(decap::parse_allow(&["0.0.0.0".into()], None).unwrap_err().to_string().contains("cannot be a balancer"));
    assert!(decap::parse_allow(&["ff02::1".into()], None).is_err());
    std::fs::write(&dir, "10.0.0.5\nnot-an-address\n").unwrap();
    let e = decap::parse_allow(&[], Some(&dir)).unwrap_err().to_string();
    assert!(e.ends_with(":2: \"not-an-address\" is not an IP address"), "{e}");
    let _ = std::fs::remove_file(dir);
}
