//! Socket options the safe crates do not offer: receive buffers past `net.core.rmem_max`,
//! for the sockets that must absorb bursts (the relay's UDP sockets, NFLOG).

use std::os::fd::AsRawFd;

/// Sets the socket's receive buffer to `bytes` with SO_RCVBUFFORCE, which ignores
/// `net.core.rmem_max` (needs CAP_NET_ADMIN).
pub fn force_recv_buffer(socket: &impl AsRawFd, bytes: usize) -> std::io::Result<()> {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is an open socket borrowed from `socket` for the call; `size` is a c_int
    // whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
