//! Splitting one transfer into RDMA READ or WRITE work requests.
//!
//! A transfer moves `total` bytes between a list of remote descriptors (the client's
//! memory) and a list of local pieces (the server's pool buffers), both taken front to back.
//! One work request covers a contiguous range of a single remote descriptor and gathers (or
//! scatters) at most `max_sge` local pieces; a new work request starts when the remote
//! descriptor ends or the scatter/gather list is full. So a request needs at most
//! `remote.len() + ceil(pieces / max_sge)` work requests, and the segment count a connection
//! offers may exceed the device's SGE limit.
//!
//! Pure and allocation-free: the caller provides the array each work request's entries go to.
#![forbid(unsafe_code)]

use super::msg::Desc;

/// A piece of local registered memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of its memory region.
    pub lkey: u32,
}

/// One work request of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wr {
    /// Where it starts in the peer's memory.
    pub remote_addr: u64,
    /// The peer region's key.
    pub rkey: u32,
    /// Entries written to the caller's array.
    pub n_sge: usize,
    /// Bytes it moves.
    pub len: u64,
}

/// An iterator-like cursor over the work requests of one transfer.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    remote: &'a [Desc],
    local: &'a [Local],
    ri: usize,
    roff: u64,
    li: usize,
    loff: u64,
    left: u64,
    max_sge: usize,
}

impl<'a> Plan<'a> {
    /// A plan moving `total` bytes (capped at what both lists hold) with at most `max_sge`
    /// (at least 1) local pieces per work request.
    pub fn new(remote: &'a [Desc], local: &'a [Local], total: u64, max_sge: usize) -> Plan<'a> {
        let r: u64 = remote.iter().map(|d| u64::from(d.len)).sum();
        let l: u64 = local.iter().map(|p| u64::from(p.len)).sum();
        Plan {
            remote,
            local,
            ri: 0,
            roff: 0,
            li: 0,
            loff: 0,
            left: total.min(r).min(l),
            max_sge: max_sge.max(1),
        }
    }

    /// The number of work requests the plan makes.
    pub fn count(&self) -> usize {
        let mut p = self.clone();
        let mut n = 0;
        while p.step(None).is_some() {
            n += 1;
        }
        n
    }

    /// The next work request, its entries written to the front of `sges` (which must hold
    /// at least `max_sge` entries, or the work request is cut short there).
    pub fn next_into(&mut self, sges: &mut [Local]) -> Option<Wr> {
        self.step(Some(sges))
    }

    fn step(&mut self, mut out: Option<&mut [Local]>) -> Option<Wr> {
        // Skip exhausted remote descriptors and empty local pieces.
        while self.ri < self.remote.len() && self.roff >= u64::from(self.remote[self.ri].len) {
            self.ri += 1;
            self.roff = 0;
        }
        while self.li < self.local.len() && self.loff >= u64::from(self.local[self.li].len) {
            self.li += 1;
            self.loff = 0;
        }
        if self.left == 0 || self.ri >= self.remote.len() || self.li >= self.local.len() {
            return None;
        }
        let d = self.remote[self.ri];
        let max = match &out {
            Some(o) => self.max_sge.min(o.len()).max(1),
            None => self.max_sge,
        };
        let mut room = (u64::from(d.len) - self.roff).min(self.left);
        let wr_start = d.addr.wrapping_add(self.roff);
        let mut n = 0;
        let mut len = 0u64;
        while room > 0 && n < max && self.li < self.local.len() {
            let p = self.local[self.li];
            let avail = u64::from(p.len) - self.loff;
            if avail == 0 {
                self.li += 1;
                self.loff = 0;
                continue;
            }
            let k = avail.min(room);
            if let Some(o) = out.as_deref_mut() {
                if n < o.len() {
                    o[n] = Local {
                        addr: p.addr.wrapping_add(self.loff),
                        // k <= p.len, a u32.
                        len: k as u32,
                        lkey: p.lkey,
                    };
                }
            }
            n += 1;
            len += k;
            room -= k;
            self.loff += k;
            if self.loff == u64::from(p.len) {
                self.li += 1;
                self.loff = 0;
            }
        }
        self.roff += len;
        self.left -= len;
        Some(Wr {
            remote_addr: wr_start,
            rkey: d.rkey,
            n_sge: n,
            len,
        })
    }
}

/// Appends `d` to `out`, merging it into the last descriptor when it continues it (same key,
/// adjacent address, combined length still a `u32`).
pub fn push_desc(out: &mut Vec<Desc>, d: Desc) {
    if d.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.rkey == d.rkey
            && last.addr.checked_add(u64::from(last.len)) == Some(d.addr)
            && last.len.checked_add(d.len).is_some()
        {
            last.len += d.len;
            return;
        }
    }
    out.push(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(remote: &[Desc], local: &[Local], total: u64, max_sge: usize) -> Vec<(Wr, Vec<Local>)> {
        let mut p = Plan::new(remote, local, total, max_sge);
        let expect = p.count();
        let mut out = Vec::new();
        let mut sges = [Local::default(); 32];
        while let Some(w) = p.next_into(&mut sges) {
            out.push((w, sges[..w.n_sge].to_vec()));
        }
        assert_eq!(out.len(), expect, "count() disagrees with the walk");
        out
    }

    /// Simulates the transfer byte by byte: remote and local memory as one address space.
    fn check(remote: &[Desc], local: &[Local], total: u64, max_sge: usize) -> usize {
        let wrs = run(remote, local, total, max_sge);
        let mut remote_bytes = Vec::new();
        for d in remote {
            remote_bytes.extend((0..u64::from(d.len)).map(|i| d.addr + i));
        }
        let mut local_bytes = Vec::new();
        for p in local {
            local_bytes.extend((0..u64::from(p.len)).map(|i| p.addr + i));
        }
        let want = total
            .min(remote_bytes.len() as u64)
            .min(local_bytes.len() as u64) as usize;
        let mut got_r = Vec::new();
        let mut got_l = Vec::new();
        for (w, sges) in &wrs {
            assert!(sges.len() <= max_sge);
            assert!(!sges.is_empty());
            let n: u64 = sges.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(n, w.len);
            got_r.extend((0..w.len).map(|i| w.remote_addr + i));
            for s in sges {
                got_l.extend((0..u64::from(s.len)).map(|i| s.addr + i));
            }
            // One work request stays within one remote descriptor (one rkey range).
            assert!(remote.iter().any(|d| d.rkey == w.rkey
                && w.remote_addr >= d.addr
                && w.remote_addr + w.len <= d.addr + u64::from(d.len)));
        }
        assert_eq!(got_r, remote_bytes[..want]);
        assert_eq!(got_l, local_bytes[..want]);
        wrs.len()
    }

    fn desc(addr: u64, len: u32, rkey: u32) -> Desc {
        Desc { addr, rkey, len }
    }

    fn loc(addr: u64, len: u32) -> Local {
        Local { addr, len, lkey: 7 }
    }

    #[test]
    fn shapes() {
        // One to one.
        assert_eq!(check(&[desc(1000, 100, 1)], &[loc(5000, 100)], 100, 4), 1);
        // Many local pieces into one remote range, split by max_sge.
        let local: Vec<Local> = (0..10).map(|i| loc(10_000 + i * 100, 10)).collect();
        assert_eq!(check(&[desc(0, 100, 1)], &local, 100, 4), 3);
        assert_eq!(check(&[desc(0, 100, 1)], &local, 100, 32), 1);
        // One local piece across many remote descriptors.
        let remote: Vec<Desc> = (0..5).map(|i| desc(i * 1000, 20, i as u32)).collect();
        assert_eq!(check(&remote, &[loc(9000, 100)], 100, 2), 5);
        // Short transfer: stops at `total`.
        check(&remote, &[loc(9000, 100)], 33, 2);
        // Mismatched, odd sizes.
        let remote = [
            desc(0, 7, 1),
            desc(100, 4095, 2),
            desc(9000, 1, 3),
            desc(20_000, 5000, 4),
        ];
        let local = [
            loc(50_000, 3000),
            loc(60_000, 1),
            loc(70_000, 0),
            loc(80_000, 6102),
        ];
        check(&remote, &local, 9103, 2);
        check(&remote, &local, 9103, 32);
        check(&remote, &local, 10, 1);
        // Nothing to do.
        assert_eq!(check(&remote, &local, 0, 4), 0);
        assert_eq!(check(&[], &local, 10, 4), 0);
    }

    #[test]
    fn merging_descriptors() {
        let mut v = Vec::new();
        push_desc(&mut v, desc(0, 10, 1));
        push_desc(&mut v, desc(10, 10, 1));
        push_desc(&mut v, desc(20, 10, 2));
        push_desc(&mut v, desc(40, 10, 2));
        push_desc(&mut v, desc(50, 0, 2));
        push_desc(&mut v, desc(50, u32::MAX, 2));
        assert_eq!(
            v,
            [
                desc(0, 20, 1),
                desc(20, 10, 2),
                desc(40, 10, 2),
                desc(50, u32::MAX, 2)
            ]
        );
        push_desc(&mut v, desc(50 + u64::from(u32::MAX), 1, 2));
        assert_eq!(v.len(), 5);
    }
}
