//! Entering a named network namespace on a dedicated thread.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// How long [`connect_tcp`] waits for a connection before giving up.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `ip netns add` pins a namespace.
pub(crate) fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `f` on a fresh thread that has joined the network namespace `name`.
///
/// Sockets created by `f` belong to that namespace for their whole life, and threads spawned
/// by `f` (for example a tokio runtime's workers) start in it too. A panic in `f` is
/// propagated to the caller.
pub(crate) fn run_in<F, T>(name: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(path(name)).map_err(|source| Error::Io {
        action: "open network namespace",
        path: path(name),
        source,
    })?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Setns {
                netns: name.to_owned(),
                source,
            })?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Binds a TCP listener inside `netns`.
pub(crate) fn bind_tcp(netns: &str, addr: SocketAddr) -> Result<TcpListener> {
    run_in(netns, || TcpListener::bind(addr))?.map_err(|source| Error::Socket {
        action: "bind",
        addr,
        netns: netns.to_owned(),
        source,
    })
}

/// Connects to `addr` from inside `netns` (5 s timeout).
pub(crate) fn connect_tcp(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    run_in(netns, || TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))?.map_err(|source| {
        Error::Socket {
            action: "connect",
            addr,
            netns: netns.to_owned(),
            source,
        }
    })
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Writes a sysctl (`net.ipv4.ip_forward` style key) as seen from inside `netns`.
pub(crate) fn write_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    let file_path = path.clone();
    run_in(netns, move || {
        File::options()
            .write(true)
            .open(&file_path)
            .and_then(|mut file| file.write_all(value.as_bytes()))
    })?
    .map_err(|source| Error::Io {
        action: "write sysctl",
        path,
        source,
    })
}

/// Reads a sysctl as seen from inside `netns`, trimmed.
pub(crate) fn read_sysctl(netns: &str, key: &str) -> Result<String> {
    let path = sysctl_path(key);
    let file_path = path.clone();
    run_in(netns, move || {
        let mut text = String::new();
        File::open(&file_path)
            .and_then(|mut file| file.read_to_string(&mut text))
            .map(|_| text.trim().to_owned())
    })?
    .map_err(|source| Error::Io {
        action: "read sysctl",
        path,
        source,
    })
}
