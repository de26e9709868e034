//! Socket addresses, and the `getsock*` calls the rules need (none of them is wrapped).

use std::mem::{size_of, zeroed};

use libc::{c_int, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};

/// Port and IPv6 address (IPv4 mapped) of an AF_INET/AF_INET6 address; `None` for any other
/// family or a short length.
///
/// # Safety
/// `addr` is null or valid for reads of `len` bytes.
pub unsafe fn inet(addr: *const sockaddr, len: socklen_t) -> Option<(u16, [u8; 16])> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: `addr` is readable for at least the family field (checked above); unaligned
    // reads because the app's buffer need not be aligned.
    let family = unsafe { std::ptr::addr_of!((*addr).sa_family).read_unaligned() };
    match c_int::from(family) {
        libc::AF_INET if len as usize >= size_of::<sockaddr_in>() => {
            // SAFETY: `len` covers a whole sockaddr_in.
            let a = unsafe { addr.cast::<sockaddr_in>().read_unaligned() };
            let [p, q, r, s] = a.sin_addr.s_addr.to_ne_bytes();
            let ip = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, p, q, r, s];
            Some((u16::from_be(a.sin_port), ip))
        }
        libc::AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
            // SAFETY: `len` covers a whole sockaddr_in6.
            let a = unsafe { addr.cast::<sockaddr_in6>().read_unaligned() };
            Some((u16::from_be(a.sin6_port), a.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

type GetName = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

fn name(fd: c_int, f: GetName) -> Option<(u16, [u8; 16])> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    let p = std::ptr::addr_of_mut!(ss).cast::<sockaddr>();
    // SAFETY: `p` points to a writable sockaddr_storage of `len` bytes.
    if unsafe { f(fd, p, &mut len) } != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes (at most the storage's size) at `p`.
    unsafe { inet(p, len.min(size_of::<sockaddr_storage>() as socklen_t)) }
}

/// The socket's local port, if it is an inet socket.
pub fn local_port(fd: c_int) -> Option<u16> {
    name(fd, libc::getsockname).map(|(port, _)| port)
}

/// The socket's peer port, if it is a connected inet socket.
pub fn peer_port(fd: c_int) -> Option<u16> {
    name(fd, libc::getpeername).map(|(port, _)| port)
}

/// Whether the socket is TCP.
pub fn is_tcp(fd: c_int) -> bool {
    let mut proto: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `proto` is a writable int and `len` its size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            std::ptr::addr_of_mut!(proto).cast(),
            &mut len,
        )
    };
    r == 0 && proto == libc::IPPROTO_TCP
}
