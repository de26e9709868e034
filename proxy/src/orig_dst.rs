//! The original destination of a connection that iptables redirected to us
//! (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`).
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
    use std::mem::{size_of, MaybeUninit};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::{AsRawFd, RawFd};

    pub(super) fn original_dst(
        stream: &tokio::net::TcpStream,
        local: SocketAddr,
    ) -> io::Result<Option<SocketAddr>> {
        let fd = stream.as_raw_fd();
        // An IPv4 client on a dual-stack `[::]` listener is IPv4 to conntrack.
        let ipv4 = match local {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        let got = if ipv4 { ipv4_dst(fd) } else { ipv6_dst(fd) };
        match got {
            Ok(dst) if same_addr(dst, local) => Ok(None),
            Ok(dst) => Ok(Some(dst)),
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

    fn ipv4_dst(fd: RawFd) -> io::Result<SocketAddr> {
        let sin: libc::sockaddr_in = getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST)?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sin.sin_port),
        )))
    }

    fn ipv6_dst(fd: RawFd) -> io::Result<SocketAddr> {
        let sin6: libc::sockaddr_in6 = getsockopt(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)?;
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(sin6.sin6_port),
            u32::from_be(sin6.sin6_flowinfo),
            sin6.sin6_scope_id,
        )))
    }

    /// `getsockopt` for a plain-old-data sockaddr `T`.
    fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
        let mut value = MaybeUninit::<T>::zeroed();
        let mut len = size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` is a writable buffer of `len` bytes that lives across the call, and
        // the sockaddr types used here are valid for any bit pattern (zeroed first).
        let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised and (partly) written by the kernel; any bytes are valid.
        Ok(unsafe { value.assume_init() })
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
