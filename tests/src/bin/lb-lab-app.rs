//! `lb-lab-app`: the lab's application server (tests/src/lab.rs), a small real HTTP
//! service whose data lives in MariaDB, reached through the db VIP with the `mariadb`
//! command-line client (one bounded process per request: simple, no new crate).
//!
//!     lb-lab-app --name app1 --listen 0.0.0.0:8080 --db 10.201.0.3:3306
//!
//! - `GET /healthz` → `ok` (no database: the balancer's check of this process)
//! - `GET /app/visit` → increments the visit counter, `{"app":..,"web":..,"visits":N}`
//! - `GET /app/items` → `{"app":..,"web":..,"items":[..]}`
//! - `GET|POST /app/items/add?name=x` → inserts x (`[A-Za-z0-9_-]{1,32}`)
//!
//! `web` is the `X-Web` header nginx adds (which web server proxied). One request per
//! connection (`Connection: close`); every socket and database call has a timeout.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DB_TIMEOUT: Duration = Duration::from_secs(3);

struct Cfg {
    name: String,
    db_host: String,
    db_port: String,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut name, mut listen, mut db) = ("app".to_string(), "0.0.0.0:8080".to_string(), "127.0.0.1:3306".to_string());
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = v,
            "--listen" => listen = v,
            "--db" => db = v,
            other => panic!("unknown argument {other}"),
        }
    }
    let (h, p) = db.rsplit_once(':').expect("--db HOST:PORT");
    let cfg: &'static Cfg = Box::leak(Box::new(Cfg { name, db_host: h.to_string(), db_port: p.to_string() }));
    let l = TcpListener::bind(&listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    eprintln!("{}: listening on {listen}, db {db}", cfg.name);
    for s in l.incoming().flatten() {
        let _ = std::thread::Builder::new().spawn(move || {
            let _ = handle(s, cfg);
        });
    }
}

fn handle(mut s: TcpStream, cfg: &Cfg) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        if Instant::now() > deadline || req.len() > 16384 {
            return Ok(());
        }
        match s.read(&mut buf)? {
            0 => return Ok(()),
            n => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let web = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-web"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "-".into());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, body) = route(cfg, method, path, query, &web);
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-App: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        cfg.name
    )?;
    s.flush()
}

fn route(cfg: &Cfg, method: &str, path: &str, query: &str, web: &str) -> (&'static str, String) {
    let app = &cfg.name;
    let err = |e: String| ("502 Bad Gateway", format!("{{\"app\":\"{app}\",\"web\":\"{web}\",\"error\":{}}}\n", json_str(&e)));
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", "ok\n".into()),
        ("GET", "/app/visit") => {
            match sql(cfg, "UPDATE visits SET n = n + 1 WHERE id = 1; SELECT n FROM visits WHERE id = 1;") {
                Ok(out) => match out.trim().parse::<u64>() {
                    Ok(n) => ("200 OK", format!("{{\"app\":\"{app}\",\"web\":\"{web}\",\"visits\":{n}}}\n")),
                    Err(_) => err(format!("unexpected answer {out:?}")),
                },
                Err(e) => err(e),
            }
        }
        ("GET", "/app/items") => match sql(cfg, "SELECT name FROM items ORDER BY id;") {
            Ok(out) => {
                let items: Vec<String> = out.lines().map(json_str).collect();
                ("200 OK", format!("{{\"app\":\"{app}\",\"web\":\"{web}\",\"items\":[{}]}}\n", items.join(",")))
            }
            Err(e) => err(e),
        },
        ("GET" | "POST", "/app/items/add") => {
            let name = query.split('&').find_map(|kv| kv.strip_prefix("name=")).unwrap_or("");
            if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return ("400 Bad Request", "{\"error\":\"name: [A-Za-z0-9_-]{1,32}\"}\n".into());
            }
            match sql(cfg, &format!("INSERT INTO items (name) VALUES ('{name}'); SELECT COUNT(*) FROM items;")) {
                Ok(out) => ("200 OK", format!("{{\"app\":\"{app}\",\"web\":\"{web}\",\"added\":\"{name}\",\"items\":{}}}\n", out.trim())),
                Err(e) => err(e),
            }
        }
        _ => ("404 Not Found", "{\"error\":\"not found\"}\n".into()),
    }
}

/// Runs `q` in database `lab` through the db VIP; stdout (tab-separated, no headers).
/// Killed after `DB_TIMEOUT`.
fn sql(cfg: &Cfg, q: &str) -> Result<String, String> {
    let mut child = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=TCP", "-h", &cfg.db_host, "-P", &cfg.db_port, "-u", "lab", "-plab"])
        .args(["--connect-timeout=2", "-N", "-B", "lab", "-e", q])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("mariadb client: {e}"))?;
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t.elapsed() < DB_TIMEOUT => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("database timed out after {DB_TIMEOUT:?}"));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o + "\""
}
