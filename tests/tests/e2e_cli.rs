//! The operator's CLI against a real lbd in a namespace (prefix `tl-`): exit codes and
//! JSON for every outcome, the default weight of `backend add`, `config dump`/`diff`,
//! `stats --watch`, `detach` confirmation, and `lbd --detach` with nothing pinned.
//! Root, under the root test lock.

use std::process::{Command, Stdio};

use lb_tests::lbd::{Lbd, bin};
use lb_tests::netns::{ServerMode, TopoSpec, Topology, vip_v4};
use lb_userspace::config::Config;
use serde_json::Value;

const PREFIX: &str = "tl-cli-";
const INSTANCE: &str = "tlcli";

/// lbctl with `args` against `l`: (exit code, stdout, stderr), stdin closed.
fn lbctl(l: &Lbd, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(bin("lbctl")).arg("--socket").arg(l.socket()).args(args).stdin(Stdio::null()).output().expect("lbctl");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out:?}"))
}

#[test]
fn cli_exit_codes_json_config_dump_diff_watch_and_detach() {
    lb_tests::require_root();
    let t = Topology::new(PREFIX, TopoSpec { lbs: 1, backends: 3 });
    let mut l = Lbd::new(&t, 0, INSTANCE);
    let be = |i: usize| t.backends[i].v4.to_string();
    let web = vip_v4(1);
    l.write_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{web}:80/tcp\"\ntable_size = 251\n\n\
         [[service.backend]]\naddress = \"{}\"\nweight = 100\n\n[[service.backend]]\naddress = \"{}\"\nweight = 100\n",
        be(0),
        be(1)
    ));
    l.start();

    // 0 ok, JSON of the data.
    let (code, out, _) = lbctl(&l, &["-o", "json", "status"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["instance"], INSTANCE);
    // 1 refused by lbd: JSON error on stdout.
    let (code, out, err) = lbctl(&l, &["-o", "json", "backend", "remove", "nosuch", &be(0)]);
    assert_eq!(code, 1, "{err}");
    let v = json(&out);
    assert_eq!((v["ok"].as_bool(), v["kind"].as_str(), v["exit_code"].as_u64()), (Some(false), Some("refused"), Some(1)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("nosuch"), "{v}");
    // 2 usage: clap's error as JSON too.
    let (code, out, _) = lbctl(&l, &["-o", "json", "backend", "add", "web", "not-an-ip"]);
    assert_eq!(code, 2);
    assert_eq!(json(&out)["kind"], "usage");
    let (code, _, _) = lbctl(&l, &["frobnicate"]);
    assert_eq!(code, 2);
    // 3 unreachable: a socket nobody listens on.
    let o = Command::new(bin("lbctl")).args(["--socket", "/run/lb/tl-cli-nobody.sock", "-o", "json", "status"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["kind"], "unreachable");

    // backend add without --weight: the service's most common weight, and says so.
    let (code, _, err) = lbctl(&l, &["backend", "add", "web", &be(2)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("used 100, the most common weight"), "{err}");
    let (_, out, _) = lbctl(&l, &["-o", "json", "backend", "list", "web"]);
    let list = json(&out);
    let added = list.as_array().unwrap().iter().find(|b| b["address"] == be(2).as_str()).expect("added backend");
    assert_eq!(added["weight"], 100);

    // config diff: the CLI change is running only; config dump writes a file lbd accepts
    // whose services are the running ones, after which diff shows nothing.
    let (code, out, err) = lbctl(&l, &["config", "diff"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("backend {}", be(2))) && out.contains("weight 100"), "{out}");
    let (_, out, _) = lbctl(&l, &["-o", "json", "config", "diff"]);
    let d = json(&out)["differences"].as_array().unwrap().clone();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0]["file"].is_null(), d[0]["running"].as_str()), (true, Some("weight 100")));
    let (code, dumped, err) = lbctl(&l, &["config", "dump", "-o", "toml"]);
    assert_eq!(code, 0, "{err}");
    let dump_path = l.dir.join("dumped.toml");
    std::fs::write(&dump_path, &dumped).unwrap();
    let cfg = Config::parse(&dumped).unwrap_or_else(|e| panic!("dumped config refused: {e}\n{dumped}"));
    assert_eq!(cfg.instance, INSTANCE);
    assert_eq!(cfg.services.len(), 1);
    assert_eq!(cfg.services[0].backends.len(), 3);
    let check = Command::new(bin("lbd")).args(["--check", "--config"]).arg(&dump_path).output().unwrap();
    assert!(check.status.success(), "lbd --check on the dump: {}", String::from_utf8_lossy(&check.stderr));
    let (_, out, _) = lbctl(&l, &["config", "diff", "--file", dump_path.to_str().unwrap()]);
    assert!(out.starts_with("no difference"), "{out}");
    let (code, _, _) = lbctl(&l, &["status", "-o", "toml"]);
    assert_eq!(code, 2, "-o toml is for config dump only");

    // stats --watch: one JSON document per sample, rates from the second one on.
    let (code, out, err) = lbctl(&l, &["-o", "json", "stats", "--watch", "--interval", "0.2", "--count", "2"]);
    assert_eq!(code, 0, "{err}");
    let samples: Vec<Value> = out.lines().map(json).collect();
    assert_eq!(samples.len(), 2);
    let rows = samples[1]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "the service and its 3 backends: {rows:?}");
    assert!(rows.iter().all(|r| r["pps"].is_number()), "{rows:?}");
    assert!(samples[0]["rows"].as_array().unwrap().iter().all(|r| r["pps"].is_null()));
    let (code, out, _) = lbctl(&l, &["stats", "--watch", "--interval", "0.1", "--count", "1"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("\x1b[H\x1b[2J") && out.contains("NEW FLOWS/S"), "{out:?}");

    // flow lookup: a real connection's flow entry names the backend that answered, and
    // so does the Maglev pick; a port never used has no entry, only the pick.
    t.add_vip_to_backends(web);
    t.start_servers(80, ServerMode::Echo);
    let resolved = lb_tests::lbd::wait_for(std::time::Duration::from_secs(10), || {
        let (_, out, _) = lbctl(&l, &["-o", "json", "backend", "list", "web"]);
        json(&out).as_array().unwrap().iter().all(|b| b["next_hop"] != "unresolved")
    });
    assert!(resolved.is_some(), "next hops resolved");
    let conn = t.connect(web, 80).unwrap_or_else(|e| panic!("connecting through the VIP: {e}\n{}", l.log()));
    let answered = t.backends.iter().find(|b| b.name == conn.backend).expect("the backend that answered").v4.to_string();
    let client = conn.local.to_string();
    let dest = format!("{web}:80/tcp");
    let (code, out, err) = lbctl(&l, &["-o", "json", "flow", "lookup", &client, &dest]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["service"], "web");
    assert_eq!(v["flow"]["backend"], answered.as_str(), "{v}");
    assert_eq!(v["flow"]["valid"], true);
    assert_eq!(v["maglev"]["backend"], answered.as_str(), "{v}");
    assert_eq!(v["backend"], answered.as_str());
    let unused = format!("{}:1", conn.local.ip());
    let (_, out, _) = lbctl(&l, &["-o", "json", "flow", "lookup", &unused, &dest]);
    let v = json(&out);
    assert!(v["flow"].is_null() && v["backend"] == v["maglev"]["backend"] && v["backend"].is_string(), "{v}");
    let (code, out, _) = lbctl(&l, &["flow", "lookup", &client, &dest]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("entry: {answered}")), "{out}");
    let (code, _, err) = lbctl(&l, &["flow", "lookup", &client, "10.99.0.1:80/tcp"]);
    assert_eq!(code, 1, "no service there: {err}");
    drop(conn);

    // detach: refused without --yes when it cannot ask; lbd keeps running.
    let (code, _, err) = lbctl(&l, &["detach"]);
    assert_eq!(code, 2);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(lbctl(&l, &["status"]).0, 0, "still running");
    let (code, _, err) = lbctl(&l, &["detach", "--yes"]);
    assert_eq!(code, 0, "{err}");
    let gone = lb_tests::lbd::wait_for(std::time::Duration::from_secs(5), || !l.socket().exists());
    assert!(gone.is_some(), "lbd stopped");
    l.kill();

    // lbd --detach with nothing pinned succeeds, twice (ExecStopPost=).
    for _ in 0..2 {
        let o = Command::new(bin("lbd")).args(["--detach", "--config"]).arg(l.config_path()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("nothing pinned"));
    }
    // A config error is exit 2 for lbd too.
    let o = Command::new(bin("lbd")).args(["--config", "/nonexistent/tl-cli.toml"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let v = Command::new(bin("lbd")).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(v.starts_with("lbd ") && v.contains("(git "), "{v}");
}
