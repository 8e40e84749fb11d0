//! One server on several transports: a [`Listener`] that accepts from several listeners at
//! once (one thread each), so that one [`crate::Server`] (one export, one pool, one set of
//! limits: connections, requests in flight, open files) serves them all.
//!
//! [`listen_all`] binds every transport of `cfg`'s list: the first on `server.listen`, the
//! k-th (k = 1, 2, ...) on the same host at port + k (port 0 stays 0: each picks a free
//! port). [`Listener::local_addr`] names each: `tcp=127.0.0.1:7700 rdma=127.0.0.1:7701`.

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use super::{Listener, ServerConn};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock;
use crate::pool::Pool;
use crate::transport::Registry;

type Accepted = Result<Result<Box<dyn ServerConn>>>;

/// Several listeners behind one [`Listener`].
pub struct MultiListener {
    parts: Vec<(&'static str, Arc<dyn Listener>)>,
    rx: Mutex<Receiver<Accepted>>,
}

impl std::fmt::Debug for MultiListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.local_addr())
    }
}

/// The address the `k`-th transport of a list listens on: `base` with its port + k.
pub fn nth_addr(base: &str, k: usize) -> Result<String> {
    if k == 0 {
        return Ok(base.to_string());
    }
    let (host, port) = base
        .rsplit_once(':')
        .ok_or_else(|| Error::config("server.listen", base, "expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| Error::config("server.listen", base, "bad port"))?;
    if port == 0 {
        return Ok(base.to_string());
    }
    let p = port
        .checked_add(k as u16)
        .ok_or_else(|| Error::config("server.listen", base, "no room for the next ports"))?;
    Ok(format!("{host}:{p}"))
}

/// Binds every transport of `cfg.transport_list()` (see the module docs).
pub fn listen_all(cfg: &Config, registry: &Registry, pool: &Pool) -> Result<MultiListener> {
    let mut parts = Vec::new();
    for (k, name) in cfg.transport_list().into_iter().enumerate() {
        let t = registry.get(name, cfg)?;
        let mut c = cfg.clone();
        c.server.listen = nth_addr(&cfg.server.listen, k)?;
        let l: Arc<dyn Listener> = Arc::from(t.listen(&c, pool)?);
        parts.push((t.name(), l));
    }
    MultiListener::new(parts)
}

impl MultiListener {
    /// Accepts from every listener given, each named by its transport.
    pub fn new(parts: Vec<(&'static str, Arc<dyn Listener>)>) -> Result<MultiListener> {
        let (tx, rx) = channel();
        for (name, l) in &parts {
            let (tx, l) = (tx.clone(), l.clone());
            std::thread::Builder::new()
                .name(format!("zcio-{name}-accept"))
                .spawn(move || loop {
                    let r = l.accept();
                    let fatal = r.is_err();
                    if tx.send(r).is_err() || fatal {
                        return;
                    }
                })
                .map_err(|e| Error::io("spawn an accept thread", e))?;
        }
        Ok(MultiListener {
            parts,
            rx: Mutex::new(rx),
        })
    }
}

impl Listener for MultiListener {
    /// The next connection from any transport. The first listener to fail ends it (the
    /// server stops, as with one listener).
    fn accept(&self) -> Result<Result<Box<dyn ServerConn>>> {
        lock(&self.rx)
            .recv()
            .unwrap_or_else(|_| Err(Error::ConnectionClosed("every listener is closed".into())))
    }

    fn local_addr(&self) -> String {
        self.parts
            .iter()
            .map(|(n, l)| format!("{n}={}", l.local_addr()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn shutdown(&self) {
        for (_, l) in &self.parts {
            l.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::nth_addr;

    #[test]
    fn the_kth_transport_listens_on_the_next_port() {
        assert_eq!(nth_addr("127.0.0.1:7700", 0).unwrap(), "127.0.0.1:7700");
        assert_eq!(nth_addr("127.0.0.1:7700", 1).unwrap(), "127.0.0.1:7701");
        assert_eq!(nth_addr("[::1]:0", 1).unwrap(), "[::1]:0");
        assert!(nth_addr("127.0.0.1:65535", 1).is_err());
        assert!(nth_addr("nowhere", 1).is_err());
    }
}
