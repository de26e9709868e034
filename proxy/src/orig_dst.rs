//! The original destination of a connection that iptables redirected to us
//! (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, read with socket2).
//!
//! `tracecar-proxy init` installs nat `REDIRECT` rules; conntrack remembers the address the
//! peer dialled, and these socket options read it back. A connection that was not redirected
//! (the app used `HTTP_PROXY`, or a peer dialled the listener directly) has no NAT entry: the
//! kernel answers `ENOENT`, or the local address itself, and we return `None`.

use std::net::SocketAddr;

/// The address the peer meant to reach before the nat table redirected the connection,
/// or `None` when the connection was not redirected (it was addressed to us directly).
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    imp::original_dst(stream, local)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::net::SocketAddr;

    use socket2::SockRef;

    pub(super) fn original_dst(
        stream: &tokio::net::TcpStream,
        local: SocketAddr,
    ) -> io::Result<Option<SocketAddr>> {
        let sock = SockRef::from(stream);
        // An IPv4 client on a dual-stack `[::]` listener is IPv4 to conntrack.
        let ipv4 = match local {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        let got = if ipv4 {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        };
        match got.map(|a| a.as_socket()) {
            Ok(Some(dst)) if same_addr(dst, local) => Ok(None),
            Ok(Some(dst)) => Ok(Some(dst)),
            // Not an inet address: nothing we could connect to.
            Ok(None) => Ok(None),
            // ENOENT: conntrack has no entry (not redirected); ENOPROTOOPT: conntrack for this
            // family is not loaded in the kernel, so nothing can have been redirected.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Compares addresses treating `::ffff:a.b.c.d` and `a.b.c.d` as the same.
    pub(super) fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
        let canon = |s: SocketAddr| (s.ip().to_canonical(), s.port());
        canon(a) == canon(b)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::net::SocketAddr;

    /// Without Linux conntrack nothing is redirected.
    pub(super) fn original_dst(
        _stream: &tokio::net::TcpStream,
        _local: SocketAddr,
    ) -> std::io::Result<Option<SocketAddr>> {
        Ok(None)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::process::Command;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn direct_connections_have_no_original_destination() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind).await else {
                continue; // no IPv6 loopback here
            };
            let client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            assert_eq!(original_dst(&server).unwrap(), None, "{bind}");
            assert_eq!(original_dst(&client).unwrap(), None, "{bind}");
        }
    }

    /// Runs `f` on a thread in a fresh network namespace (root only); `None` when that is not
    /// possible here, so the caller can skip.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: plain syscalls; CLONE_NEWNET only moves this thread (and its children).
            if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0
            {
                return None;
            }
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            if !matches!(up, Ok(s) if s.success()) {
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    }

    fn iptables(bin: &str, args: &str) -> bool {
        let status = Command::new(bin).args(args.split(' ')).status();
        matches!(status, Ok(s) if s.success())
    }

    /// A connection REDIRECTed by a real nat rule reports the address that was dialled.
    #[test]
    fn redirected_connections_report_the_dialled_address() {
        let result = in_new_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut checked = Vec::new();
                for (bin, lo, dialled) in [
                    ("iptables", "127.0.0.1", "127.0.0.1:9"),
                    ("ip6tables", "::1", "[::1]:9"),
                ] {
                    let listener = TcpListener::bind((lo, 0)).await.unwrap();
                    let port = listener.local_addr().unwrap().port();
                    let rule =
                        format!("-t nat -A OUTPUT -p tcp --dport 9 -j REDIRECT --to-ports {port}");
                    if !iptables(bin, &rule) {
                        continue;
                    }
                    let dialled: SocketAddr = dialled.parse().unwrap();
                    let _client = TcpStream::connect(dialled).await.unwrap();
                    let (server, _) = listener.accept().await.unwrap();
                    assert_eq!(original_dst(&server).unwrap(), Some(dialled), "{bin}");
                    checked.push(bin);
                }
                checked
            })
        });
        match result {
            Some(checked) if !checked.is_empty() => {}
            Some(_) => eprintln!("skipped: no working iptables/ip6tables binary"),
            None => eprintln!("skipped: needs root and unshare(CLONE_NEWNET)"),
        }
    }

    #[test]
    fn mapped_and_plain_ipv4_compare_equal() {
        let plain = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 80));
        let mapped = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped(), 80));
        assert!(imp::same_addr(plain, mapped));
        assert!(!imp::same_addr(
            plain,
            SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 81))
        ));
    }
}
