//! The service manager's notify protocol (`Type=notify`), through the `sd-notify` crate:
//! READY=1 once the datapath is attached and the socket listens, RELOADING=1 / READY=1
//! around a reload, STATUS= with the role and counts, WATCHDOG=1 while the owner task
//! answers. Without `NOTIFY_SOCKET` every call does nothing; a failed send is logged,
//! never fatal (the datapath forwards whatever the service manager thinks).

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Start-up finished: lbd forwards and answers lbctl.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts; [`ready`] ends it. MONOTONIC_USEC lets `Type=notify-reload` units
/// tell this reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// One line for `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// How often to send WATCHDOG=1 when the unit sets `WatchdogSec` (half the timeout, as
/// sd_watchdog_enabled(3) advises), else None.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s
            .recv(&mut buf)
            .expect("a notify datagram within the timeout");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// One test owns the process environment (NOTIFY_SOCKET, WATCHDOG_*): tests in one
    /// binary run on threads, and the variables are process-wide.
    #[test]
    fn speaks_the_notify_protocol_to_a_bound_socket() {
        let dir = std::env::temp_dir().join(format!("lb-sdnotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // SAFETY: no other test in this crate reads or writes these variables.
        unsafe {
            std::env::remove_var("WATCHDOG_USEC");
            std::env::set_var("NOTIFY_SOCKET", &path);
        }
        assert_eq!(watchdog_interval(), None, "no WatchdogSec, no pings");
        ready("active, 3 services, 7/8 backends up");
        assert_eq!(
            recv(&sock),
            "READY=1\nSTATUS=active, 3 services, 7/8 backends up\n"
        );
        reloading();
        let r = recv(&sock);
        assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
        status("backup");
        assert_eq!(recv(&sock), "STATUS=backup\n");
        unsafe {
            std::env::set_var("WATCHDOG_USEC", "4000000");
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(2)));
        watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
        stopping();
        assert_eq!(recv(&sock), "STOPPING=1\n");
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        // Without a socket nothing is sent and nothing fails.
        ready("x");
        assert_eq!(watchdog_interval(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
