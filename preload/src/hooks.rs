//! The exported symbols: each calls the real libc function with the app's arguments and
//! returns exactly what it returned (the one exception: a runtime hook's registration write
//! to [`track::RUNTIME_FD`], which the library answers itself); [`track`] does its bookkeeping before (writes, close)
//! or after (accept, connect, reads, dup) the call.
//!
//! `epoll_wait`, `epoll_pwait` and `epoll_pwait2` are wrapped too: an event loop's next
//! callback need not follow from the last socket read (see [`track::event_loop_turned`]).
//!
//! Also wrapped: the fortified `__read_chk`, `__recv_chk` and `__recvfrom_chk` that C
//! programs built with `_FORTIFY_SOURCE` call instead of `read`, `recv` and `recvfrom`.

// These are the C library's functions, called by C code with C's contracts; they are not a
// Rust API, so they carry no `# Safety` sections.
#![allow(clippy::missing_safety_doc)]

use libc::{
    c_int, c_long, c_void, epoll_event, iovec, msghdr, sigset_t, size_t, sockaddr, socklen_t,
    ssize_t, timespec,
};

use crate::real::{self, call_real};
use crate::track;

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let cap = buffer_len(addr, len);
    let r = call_real!(
        real::ACCEPT,
        fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int,
        (fd, addr, len),
        libc::syscall(libc::SYS_accept4, fd, addr, len, 0) as c_int
    );
    track::accepted(r, addr, len, cap);
    r
}

#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let cap = buffer_len(addr, len);
    let r = call_real!(
        real::ACCEPT4,
        fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int,
        (fd, addr, len, flags),
        libc::syscall(libc::SYS_accept4, fd, addr, len, flags) as c_int
    );
    track::accepted(r, addr, len, cap);
    r
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let r = call_real!(
        real::CONNECT,
        fn(c_int, *const sockaddr, socklen_t) -> c_int,
        (fd, addr, len),
        libc::syscall(libc::SYS_connect, fd, addr, len) as c_int
    );
    track::connected(fd, addr, len, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    let r = call_real!(
        real::READ,
        fn(c_int, *mut c_void, size_t) -> ssize_t,
        (fd, buf, n),
        libc::syscall(libc::SYS_read, fd, buf, n) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    let r = call_real!(
        real::READ_CHK,
        fn(c_int, *mut c_void, size_t, size_t) -> ssize_t,
        (fd, buf, n, buflen),
        libc::syscall(libc::SYS_read, fd, buf, n) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    let r = call_real!(
        real::RECV,
        fn(c_int, *mut c_void, size_t, c_int) -> ssize_t,
        (fd, buf, n, flags),
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf,
            n,
            flags,
            0 as c_long,
            0 as c_long
        ) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    let r = call_real!(
        real::RECV_CHK,
        fn(c_int, *mut c_void, size_t, size_t, c_int) -> ssize_t,
        (fd, buf, n, buflen, flags),
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf,
            n,
            flags,
            0 as c_long,
            0 as c_long
        ) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let r = call_real!(
        real::RECVFROM,
        fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t,
        (fd, buf, n, flags, addr, len),
        libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, addr, len) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let r = call_real!(
        real::RECVFROM_CHK,
        fn(c_int, *mut c_void, size_t, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t,
        (fd, buf, n, buflen, flags, addr, len),
        libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, addr, len) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let r = call_real!(
        real::RECVMSG,
        fn(c_int, *mut msghdr, c_int) -> ssize_t,
        (fd, msg, flags),
        libc::syscall(libc::SYS_recvmsg, fd, msg, flags) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    let r = call_real!(
        real::READV,
        fn(c_int, *const iovec, c_int) -> ssize_t,
        (fd, iov, cnt),
        libc::syscall(libc::SYS_readv, fd, iov, cnt) as ssize_t
    );
    track::read(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if fd == track::RUNTIME_FD {
        // SAFETY: `buf`/`n` are the write's own arguments.
        if let Some(r) = unsafe { track::runtime_says(buf, n) } {
            return r;
        }
    }
    track::writing(fd);
    call_real!(
        real::WRITE,
        fn(c_int, *const c_void, size_t) -> ssize_t,
        (fd, buf, n),
        libc::syscall(libc::SYS_write, fd, buf, n) as ssize_t
    )
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    track::writing(fd);
    call_real!(
        real::SEND,
        fn(c_int, *const c_void, size_t, c_int) -> ssize_t,
        (fd, buf, n, flags),
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf,
            n,
            flags,
            0 as c_long,
            0 as c_long
        ) as ssize_t
    )
}

#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    track::writing(fd);
    call_real!(
        real::SENDTO,
        fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t,
        (fd, buf, n, flags, addr, len),
        libc::syscall(libc::SYS_sendto, fd, buf, n, flags, addr, len) as ssize_t
    )
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    track::writing(fd);
    call_real!(
        real::SENDMSG,
        fn(c_int, *const msghdr, c_int) -> ssize_t,
        (fd, msg, flags),
        libc::syscall(libc::SYS_sendmsg, fd, msg, flags) as ssize_t
    )
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    track::writing(fd);
    call_real!(
        real::WRITEV,
        fn(c_int, *const iovec, c_int) -> ssize_t,
        (fd, iov, cnt),
        libc::syscall(libc::SYS_writev, fd, iov, cnt) as ssize_t
    )
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    track::closing(fd);
    call_real!(
        real::CLOSE,
        fn(c_int) -> c_int,
        (fd),
        libc::syscall(libc::SYS_close, fd) as c_int
    )
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let r = call_real!(
        real::DUP,
        fn(c_int) -> c_int,
        (fd),
        libc::syscall(libc::SYS_dup, fd) as c_int
    );
    track::duplicated(fd, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let r = call_real!(
        real::DUP2,
        fn(c_int, c_int) -> c_int,
        (old, new),
        dup2_syscall(old, new)
    );
    track::duplicated(old, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let r = call_real!(
        real::DUP3,
        fn(c_int, c_int, c_int) -> c_int,
        (old, new, flags),
        libc::syscall(libc::SYS_dup3, old, new, flags) as c_int
    );
    track::duplicated(old, r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    let r = call_real!(
        real::EPOLL_WAIT,
        fn(c_int, *mut epoll_event, c_int, c_int) -> c_int,
        (epfd, events, max, timeout),
        libc::syscall(
            libc::SYS_epoll_pwait,
            epfd,
            events,
            max,
            timeout,
            0 as c_long,
            8 as c_long
        ) as c_int
    );
    track::event_loop_turned();
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const sigset_t,
) -> c_int {
    let r = call_real!(
        real::EPOLL_PWAIT,
        fn(c_int, *mut epoll_event, c_int, c_int, *const sigset_t) -> c_int,
        (epfd, events, max, timeout, sigmask),
        libc::syscall(
            libc::SYS_epoll_pwait,
            epfd,
            events,
            max,
            timeout,
            sigmask,
            8 as c_long
        ) as c_int
    );
    track::event_loop_turned();
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    let r = call_real!(
        real::EPOLL_PWAIT2,
        fn(c_int, *mut epoll_event, c_int, *const timespec, *const sigset_t) -> c_int,
        (epfd, events, max, timeout, sigmask),
        libc::syscall(
            libc::SYS_epoll_pwait2,
            epfd,
            events,
            max,
            timeout,
            sigmask,
            8 as c_long
        ) as c_int
    );
    track::event_loop_turned();
    r
}

/// The size of the app's address buffer, read before the call: afterwards the kernel has put
/// the address's full length there, which may be more than the buffer holds.
/// The size of the app's address buffer for `accept`. Without a buffer (`addr` null) the kernel
/// ignores `len`, so the app may pass anything there: it is not read then.
unsafe fn buffer_len(addr: *const sockaddr, len: *const socklen_t) -> socklen_t {
    if addr.is_null() || len.is_null() {
        0
    } else {
        // SAFETY: with a buffer, `len` given to accept points to a readable socklen_t.
        unsafe { *len }
    }
}

/// `dup2` as a system call: dup3, except that dup2(fd, fd) checks fd and returns it.
unsafe fn dup2_syscall(old: c_int, new: c_int) -> c_int {
    if old == new {
        // SAFETY: F_GETFD on an int fd has no memory effects.
        let r = unsafe { libc::syscall(libc::SYS_fcntl, old, libc::F_GETFD) };
        return if r < 0 { -1 } else { new };
    }
    // SAFETY: dup3 takes ints only.
    unsafe { libc::syscall(libc::SYS_dup3, old, new, 0) as c_int }
}
