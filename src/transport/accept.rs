//! A [`Listener`] for transports whose connections start on a TCP socket (TCP itself, and
//! RDMA's bootstrap): one acceptor thread takes sockets, one short-lived thread per socket
//! runs the transport's handshake, and [`Listener::accept`] returns finished handshakes in
//! the order they finish. A slow or silent peer therefore holds up only its own handshake
//! thread (the transport bounds it with a timeout), never the acceptor or other clients.
//!
//! At most [`MAX_PENDING`] sockets are in handshake or wait for `accept` at once; beyond
//! that the acceptor stops taking sockets (they wait in the kernel's backlog) until the
//! server accepts some. Of those, at most a per-address cap (by default
//! [`MAX_PENDING_PER_ADDR`]) are in handshake from one IP address: the acceptor closes
//! any more at once, so one host with slow or silent sockets cannot fill the slots and
//! lock out the others. [`Listener::shutdown`] wakes every thread blocked in `accept`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Listener, ServerConn};
use crate::error::{Error, Result};
use crate::lock;

/// Sockets in handshake or waiting for `accept`, at most.
pub const MAX_PENDING: usize = 64;

/// Sockets in handshake from one IP address, at most, unless the transport says otherwise
/// ([`HandshakeListener::spawn_with_cap`]).
pub const MAX_PENDING_PER_ADDR: usize = MAX_PENDING / 2;

/// A transport's handshake: turns an accepted socket into a connection, or says why not.
pub type Handshake = dyn Fn(TcpStream, SocketAddr) -> Result<Box<dyn ServerConn>> + Send + Sync;

enum Msg {
    Conn(Result<Box<dyn ServerConn>>),
    Closed,
}

struct Shared {
    listener: TcpListener,
    closed: AtomicBool,
    /// Sockets being handshaken or queued for `accept`.
    pending: Mutex<usize>,
    pending_cv: Condvar,
    local: String,
    transport: &'static str,
    /// Sockets in handshake per peer address, and the cap on them.
    by_addr: Mutex<HashMap<IpAddr, usize>>,
    per_addr: usize,
}

impl Shared {
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Counts a handshake from `ip` in, unless `ip` has its cap of them already.
    fn enter(&self, ip: IpAddr) -> bool {
        let mut m = lock(&self.by_addr);
        let n = m.entry(ip).or_insert(0);
        if *n >= self.per_addr {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        let mut m = lock(&self.by_addr);
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    fn acceptor(self: &Arc<Self>, tx: &Sender<Msg>, handshake: &Arc<Handshake>) {
        loop {
            {
                let mut n = lock(&self.pending);
                while *n >= MAX_PENDING && !self.closed() {
                    n = self.pending_cv.wait(n).unwrap_or_else(|p| p.into_inner());
                }
            }
            if self.closed() {
                return;
            }
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    if self.closed() {
                        return;
                    }
                    if !self.enter(peer.ip()) {
                        tracing::debug!(
                            %peer,
                            "{} connection closed: {} handshakes already in progress from {}",
                            self.transport,
                            self.per_addr,
                            peer.ip()
                        );
                        drop(sock);
                        continue;
                    }
                    *lock(&self.pending) += 1;
                    let (tx2, hs, transport) = (tx.clone(), handshake.clone(), self.transport);
                    let sh = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("zcio-{transport}-hs"))
                        .spawn(move || {
                            let r = hs(sock, peer);
                            sh.leave(peer.ip());
                            if let Err(e) = &r {
                                tracing::debug!(%peer, error = %e, "{transport} handshake failed");
                            }
                            let _ = tx2.send(Msg::Conn(r));
                        });
                    if let Err(e) = spawned {
                        self.leave(peer.ip());
                        let _ = tx.send(Msg::Conn(Err(Error::io(
                            format!("spawning a handshake thread for {peer}"),
                            e,
                        ))));
                    }
                }
                Err(_) if self.closed() => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => {
                    // Out of descriptors and the like: report it, and back off so that the
                    // loop does not spin while the condition lasts.
                    *lock(&self.pending) += 1;
                    let _ = tx.send(Msg::Conn(Err(Error::io(
                        format!("{} accept on {}", self.transport, self.local),
                        e,
                    ))));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// A listening socket with an acceptor thread and per-socket handshake threads (see the
/// module documentation).
pub struct HandshakeListener {
    shared: Arc<Shared>,
    rx: Mutex<Receiver<Msg>>,
    /// To pass the shutdown notice on to other threads blocked in `accept`.
    tx: Sender<Msg>,
    acceptor: Option<JoinHandle<()>>,
}

impl HandshakeListener {
    /// Starts accepting on `listener`, running `handshake` on each socket in its own thread.
    /// `transport` names the transport in thread names and messages. At most
    /// [`MAX_PENDING_PER_ADDR`] handshakes at once from one address.
    pub fn spawn(
        listener: TcpListener,
        transport: &'static str,
        handshake: Arc<Handshake>,
    ) -> Result<HandshakeListener> {
        HandshakeListener::spawn_with_cap(listener, transport, handshake, MAX_PENDING_PER_ADDR)
    }

    /// As [`HandshakeListener::spawn`], with at most `per_addr` handshakes at once from one
    /// IP address (at least 1).
    pub fn spawn_with_cap(
        listener: TcpListener,
        transport: &'static str,
        handshake: Arc<Handshake>,
        per_addr: usize,
    ) -> Result<HandshakeListener> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::io(format!("the {transport} listener's address"), e))?
            .to_string();
        let shared = Arc::new(Shared {
            listener,
            closed: AtomicBool::new(false),
            pending: Mutex::new(0),
            pending_cv: Condvar::new(),
            local,
            transport,
            by_addr: Mutex::new(HashMap::new()),
            per_addr: per_addr.max(1),
        });
        let (tx, rx) = channel();
        let (sh, tx2) = (shared.clone(), tx.clone());
        let acceptor = std::thread::Builder::new()
            .name(format!("zcio-{transport}-accept"))
            .spawn(move || {
                sh.acceptor(&tx2, &handshake);
                let _ = tx2.send(Msg::Closed);
            })
            .map_err(|e| Error::io(format!("spawning the {transport} acceptor thread"), e))?;
        tracing::debug!(addr = %shared.local, "{transport} listening");
        Ok(HandshakeListener {
            shared,
            rx: Mutex::new(rx),
            tx,
            acceptor: Some(acceptor),
        })
    }

    fn closed_err(&self) -> Error {
        Error::ConnectionClosed(format!(
            "the {} listener on {} was shut down",
            self.shared.transport, self.shared.local
        ))
    }
}

impl Listener for HandshakeListener {
    fn accept(&self) -> Result<Result<Box<dyn ServerConn>>> {
        if self.shared.closed() {
            return Err(self.closed_err());
        }
        let msg = lock(&self.rx).recv();
        match msg {
            Ok(Msg::Conn(r)) => {
                {
                    let mut n = lock(&self.shared.pending);
                    *n = n.saturating_sub(1);
                }
                self.shared.pending_cv.notify_one();
                Ok(r)
            }
            Ok(Msg::Closed) | Err(_) => {
                let _ = self.tx.send(Msg::Closed);
                Err(self.closed_err())
            }
        }
    }

    fn local_addr(&self) -> String {
        self.shared.local.clone()
    }

    fn shutdown(&self) {
        let sh = &self.shared;
        sh.closed.store(true, Ordering::Release);
        sh.pending_cv.notify_all();
        // On Linux, shutting a listening socket down makes a blocked accept(2) return
        // EINVAL at once: the acceptor sees `closed` and ends.
        let _ =
            nix::sys::socket::shutdown(sh.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for HandshakeListener {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}
