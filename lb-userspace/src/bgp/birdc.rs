//! A client of BIRD's control socket (what `birdc` speaks). Line based: BIRD greets
//! with `0001 BIRD <version> ready.`; each command is one line; each reply line is
//! `DDDD-text` (more lines follow), ` text` (continues the previous code, more
//! follow) or `DDDD text` (the last line). Codes 0xxx: done, 1xxx: table rows, 2xxx:
//! table headings, 8xxx: run-time error, 9xxx: parse error. The parser is pure and
//! unit-tested; `Conn` is the tokio side, every read and write bounded by a timeout.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Longest reply accepted (lines, bytes): `show protocols` on a big router is well
/// within; anything longer is refused rather than buffered without bound.
pub const MAX_LINES: usize = 100_000;
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("connecting to {path}: {error}")]
    Connect { path: String, error: std::io::Error },
    #[error("talking to BIRD: {0}")]
    Io(#[from] std::io::Error),
    #[error("BIRD did not answer within {0:?}")]
    Timeout(Duration),
    #[error("BIRD closed the control socket")]
    Closed,
    #[error("unexpected reply line {0:?}")]
    Protocol(String),
    #[error("BIRD refused: {code:04} {text}")]
    Refused { code: u16, text: String },
}

/// One reply: every line with its code (continuations carry the code before them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    /// The code of the last line.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.0)
    }

    /// 8xxx and 9xxx are errors.
    pub fn is_error(&self) -> bool {
        self.lines.iter().any(|(c, _)| *c >= 8000)
    }

    /// The error line, if any, as an error.
    pub fn check(self) -> Result<Reply, BirdError> {
        match self.lines.iter().find(|(c, _)| *c >= 8000) {
            Some((code, text)) => Err(BirdError::Refused {
                code: *code,
                text: text.clone(),
            }),
            None => Ok(self),
        }
    }

    /// Text of the lines with `code`.
    pub fn texts(&self, code: u16) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |(c, _)| *c == code)
            .map(|(_, t)| t.as_str())
    }
}

/// Collects lines into replies.
#[derive(Debug, Default)]
pub struct Parser {
    lines: Vec<(u16, String)>,
}

impl Parser {
    /// One line without its newline. `Some` when it ended a reply.
    pub fn push(&mut self, line: &str) -> Result<Option<Reply>, BirdError> {
        let bad = || BirdError::Protocol(line.chars().take(200).collect());
        if self.lines.len() >= MAX_LINES || line.len() > MAX_LINE {
            return Err(BirdError::Protocol(format!(
                "reply longer than {MAX_LINES} lines or a line above {MAX_LINE} bytes"
            )));
        }
        if let Some(rest) = line.strip_prefix(' ') {
            // A continuation: the code of the line before, more lines follow.
            let code = self.lines.last().map(|l| l.0).ok_or_else(bad)?;
            self.lines.push((code, rest.to_string()));
            return Ok(None);
        }
        let b = line.as_bytes();
        if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let code: u16 = line[..4].parse().map_err(|_| bad())?;
        let (last, text) = match b.get(4) {
            None => (true, ""),
            Some(b' ') => (true, &line[5..]),
            Some(b'-') => (false, &line[5..]),
            Some(_) => return Err(bad()),
        };
        self.lines.push((code, text.to_string()));
        Ok(last.then(|| Reply {
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

/// Whether a `configure` reply means the new config is (being) applied.
pub fn configure_ok(r: &Reply) -> Result<(), BirdError> {
    match r.code() {
        // Reconfigured, in progress, queued behind one in progress.
        3..=5 => Ok(()),
        code => Err(BirdError::Refused {
            code,
            text: r
                .lines
                .iter()
                .map(|l| l.1.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// One row of `show protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub proto: String,
    pub state: String,
    /// The info column (a BGP session's state, e.g. `Established`).
    pub info: String,
}

/// The rows (code 1002) of a `show protocols` reply: name, protocol, table, state,
/// since (one or two words, by `timeformat protocol`), info.
pub fn parse_protocols(r: &Reply) -> Vec<Protocol> {
    r.texts(1002)
        .filter_map(|t| {
            let w: Vec<&str> = t.split_whitespace().collect();
            if w.len() < 4 {
                return None;
            }
            // "since" is a time (hh:mm:ss[.frac]) possibly preceded by a date.
            let mut i = 4;
            while i < w.len() && w[i].chars().next().is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            Some(Protocol {
                name: w[0].into(),
                proto: w[1].into(),
                state: w[3].into(),
                info: w[i.min(w.len())..].join(" "),
            })
        })
        .collect()
}

/// An open control connection.
pub struct Conn {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
    pub version: String,
}

impl Conn {
    /// Connects and reads BIRD's greeting.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Conn, BirdError> {
        let s = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(error)) => {
                return Err(BirdError::Connect {
                    path: path.display().to_string(),
                    error,
                });
            }
            Err(_) => return Err(BirdError::Timeout(timeout)),
        };
        let (r, w) = s.into_split();
        let mut c = Conn {
            r: BufReader::new(r),
            w,
            timeout,
            version: String::new(),
        };
        let hello = c.reply().await?;
        if hello.code() != 1 {
            return Err(BirdError::Protocol(format!("greeting {:?}", hello.lines)));
        }
        c.version = hello.lines.last().map(|l| l.1.clone()).unwrap_or_default();
        Ok(c)
    }

    async fn reply(&mut self) -> Result<Reply, BirdError> {
        let mut p = Parser::default();
        let mut line = String::new();
        loop {
            line.clear();
            let n = match tokio::time::timeout(
                self.timeout,
                (&mut self.r).take(MAX_LINE as u64 + 2).read_line(&mut line),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(BirdError::Timeout(self.timeout)),
            };
            if n == 0 {
                return Err(BirdError::Closed);
            }
            if let Some(r) = p.push(line.trim_end_matches(['\n', '\r']))? {
                return Ok(r);
            }
        }
    }

    /// Sends one command line and reads its reply (errors included: `Reply::check`).
    pub async fn cmd(&mut self, command: &str) -> Result<Reply, BirdError> {
        if command.contains('\n') {
            return Err(BirdError::Protocol("a command is one line".into()));
        }
        let line = format!("{command}\n");
        match tokio::time::timeout(self.timeout, self.w.write_all(line.as_bytes())).await {
            Ok(r) => r?,
            Err(_) => return Err(BirdError::Timeout(self.timeout)),
        }
        self.reply().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Reply> {
        let mut p = Parser::default();
        text.lines().filter_map(|l| p.push(l).unwrap()).collect()
    }

    #[test]
    fn greeting_configure_and_errors() {
        let r = parse("0001 BIRD 2.0.12 ready.\n");
        assert_eq!(r[0].code(), 1);
        assert_eq!(r[0].lines[0].1, "BIRD 2.0.12 ready.");
        let r = parse("0002-Reading configuration from /etc/bird/bird.conf\n0003 Reconfigured\n");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].code(), 3);
        assert!(configure_ok(&r[0]).is_ok() && !r[0].is_error());
        let r = parse(
            "0002-Reading configuration from /etc/bird/bird.conf\n8002 /run/lb/x.conf:3:1 syntax error, unexpected CF_SYM_UNDEFINED\n",
        );
        assert!(r[0].is_error());
        let e = configure_ok(&r[0]).unwrap_err().to_string();
        assert!(e.contains("8002") && e.contains("syntax error"), "{e}");
        assert!(
            r[0].clone()
                .check()
                .unwrap_err()
                .to_string()
                .contains("8002")
        );
        let r = parse("9001 syntax error, unexpected CF_SYM_UNDEFINED\n");
        assert_eq!(
            r[0].clone().check().unwrap_err().to_string(),
            "BIRD refused: 9001 syntax error, unexpected CF_SYM_UNDEFINED"
        );
        // Queued behind a reconfiguration in progress: accepted.
        assert!(
            configure_ok(
                &parse("0005 Reconfiguration already in progress, queueing new config\n")[0]
            )
            .is_ok()
        );
        assert!(configure_ok(&parse("0006 Reconfiguration ignored, shutting down\n")[0]).is_err());
    }

    #[test]
    fn show_protocols_with_continuations_and_two_word_times() {
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-lb_device  Device     ---        up     22:30:01.123  \n \
                    lb_vips4   Static     master4    up     22:30:01.123  \n \
                    lb_peer1   BGP        ---        up     2026-12-01 22:30:02  Established   \n \
                    lb_peer2   BGP        ---        start  22:30:02.001  Active        Socket: Connection refused\n\
                    0000 \n";
        let r = parse(text);
        assert_eq!(r.len(), 1);
        let p = parse_protocols(&r[0]);
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(
            (
                p[2].name.as_str(),
                p[2].proto.as_str(),
                p[2].state.as_str(),
                p[2].info.as_str()
            ),
            ("lb_peer1", "BGP", "up", "Established")
        );
        assert_eq!(p[3].info, "Active Socket: Connection refused");
        assert_eq!(p[0].info, "");
    }

    #[test]
    fn malformed_lines_are_refused_not_panics() {
        for bad in [
            "",
            "abc",
            "00",
            "12x4 text",
            "0001xtext",
            " continuation first",
            "é001 x",
        ] {
            let mut p = Parser::default();
            assert!(p.push(bad).is_err(), "{bad:?}");
        }
        // Replies in sequence on one parser.
        let r = parse("0001 BIRD ready.\n0000\n1000-BIRD 2.0.12\n0000 \n");
        assert_eq!(r.iter().map(Reply::code).collect::<Vec<_>>(), [1, 0, 0]);
        let mut p = Parser::default();
        assert!(p.push(&"1".repeat(MAX_LINE + 1)).is_err());
    }

    #[tokio::test]
    async fn conn_over_a_fake_bird() {
        let dir = std::env::temp_dir().join(format!("lb-birdc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bird.ctl");
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(b"0001 BIRD 2.0.12 ready.\n").await.unwrap();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "configure\n");
            w.write_all(b"0002-Reading configuration from /x\n0003 Reconfigured\n")
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            // Never answers the second command.
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let mut c = Conn::connect(&path, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(c.version, "BIRD 2.0.12 ready.");
        configure_ok(&c.cmd("configure").await.unwrap()).unwrap();
        assert!(matches!(
            c.cmd("show protocols").await,
            Err(BirdError::Timeout(_))
        ));
        server.abort();
        let e = Conn::connect(&dir.join("nope.ctl"), Duration::from_millis(300))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.ctl"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
