//! The RDMA transfer planner (`zcio_rdma::transport::plan`): how one transfer between the
//! client's remote descriptors (from the wire) and the server's local pool pieces is cut
//! into READ/WRITE work requests, and `push_desc`, which merges descriptors.
//!
//! Input layout: `max_sge u8 | sge_room u8 | total u32 | n_remote u8 | remote... | local...`
//! where each remote descriptor is `addr u64 | rkey u8 | len u16` and each local piece
//! `addr u64 | lkey u8 | len u16` (short lengths keep transfers small; addresses are
//! arbitrary, wrapping included).
//!
//! Properties: no panic; the work requests move exactly `min(total, remote bytes, local
//! bytes)`; `count()` matches the work requests `next_into` gives; each has 1 ..= max_sge
//! entries whose lengths sum to its length; the entries, in order, walk the local pieces
//! front to back without gap or overlap, and the work requests walk the remote descriptors
//! the same way, each inside one descriptor; at most `remote + ceil(local / max_sge)` work
//! requests. `push_desc` keeps the bytes and never leaves two mergeable neighbours.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio_rdma::transport::msg::Desc;
use zcio_rdma::transport::plan::{push_desc, Local, Plan};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (h, t) = self.0.split_first_chunk::<N>()?;
        self.0 = t;
        Some(*h)
    }
    fn piece(&mut self) -> Option<(u64, u32, u32)> {
        let a = u64::from_le_bytes(self.take::<8>()?);
        let [k] = self.take::<1>()?;
        let l = u16::from_le_bytes(self.take::<2>()?);
        Some((a, u32::from(k), u32::from(l)))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let (Some([max_sge]), Some([room]), Some(total), Some([n_remote])) = (
        inp.take::<1>(),
        inp.take::<1>(),
        inp.take::<4>(),
        inp.take::<1>(),
    ) else {
        return;
    };
    let max_sge = usize::from(max_sge % 33);
    let total = u64::from(u32::from_le_bytes(total));
    let mut remote = Vec::new();
    for _ in 0..n_remote % 64 {
        match inp.piece() {
            // Descriptors on the wire have len >= 1 (msg.rs refuses 0).
            Some((addr, rkey, len)) => remote.push(Desc {
                addr,
                rkey,
                len: len.max(1),
            }),
            None => break,
        }
    }
    let mut local = Vec::new();
    while local.len() < 256 {
        match inp.piece() {
            Some((addr, lkey, len)) => local.push(Local { addr, len, lkey }),
            None => break,
        }
    }

    let r_total: u64 = remote.iter().map(|d| u64::from(d.len)).sum();
    let l_total: u64 = local.iter().map(|p| u64::from(p.len)).sum();
    let want = total.min(r_total).min(l_total);
    let eff_sge = max_sge.max(1);
    // The caller's array: normally max_sge entries; the fuzzer may give fewer (the plan
    // then cuts work requests short there) but never none.
    let room = if room & 1 == 0 {
        eff_sge
    } else {
        usize::from(room >> 1).clamp(1, eff_sge)
    };
    let mut plan = Plan::new(&remote, &local, total, max_sge);
    let counted = plan.count();
    let mut sges = vec![Local::default(); room];
    let (mut moved, mut wrs) = (0u64, 0usize);
    // Where the next local byte and the next remote byte must come from.
    let (mut li, mut loff) = (0usize, 0u64);
    let (mut ri, mut roff) = (0usize, 0u64);
    while let Some(wr) = plan.next_into(&mut sges) {
        wrs += 1;
        // count() plans with max_sge entries per work request: it agrees with next_into
        // when the caller's array holds that many (as the transport's does).
        assert!(
            room < eff_sge || wrs <= counted,
            "more work requests than count() said"
        );
        assert!(wr.n_sge >= 1 && wr.n_sge <= room, "{wr:?} with room {room}");
        assert!(wr.len >= 1, "an empty work request: {wr:?}");
        let sum: u64 = sges[..wr.n_sge].iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(sum, wr.len, "entries do not add up to the work request");
        for s in &sges[..wr.n_sge] {
            while li < local.len() && loff == u64::from(local[li].len) {
                li += 1;
                loff = 0;
            }
            let p = local[li];
            assert_eq!(s.lkey, p.lkey);
            assert_eq!(
                s.addr,
                p.addr.wrapping_add(loff),
                "gap or overlap in local pieces"
            );
            assert!(
                loff + u64::from(s.len) <= u64::from(p.len),
                "entry past its piece"
            );
            loff += u64::from(s.len);
        }
        while ri < remote.len() && roff == u64::from(remote[ri].len) {
            ri += 1;
            roff = 0;
        }
        let d = remote[ri];
        assert_eq!(wr.rkey, d.rkey);
        assert_eq!(
            wr.remote_addr,
            d.addr.wrapping_add(roff),
            "gap or overlap remotely"
        );
        assert!(
            roff + wr.len <= u64::from(d.len),
            "work request spans descriptors"
        );
        roff += wr.len;
        moved += wr.len;
    }
    if room == eff_sge {
        assert_eq!(wrs, counted, "count() and next_into disagree");
    }
    assert_eq!(moved, want, "moved {moved} of {want} bytes");
    if room == eff_sge {
        let pieces = local.iter().filter(|p| p.len > 0).count();
        assert!(
            wrs <= remote.len() + pieces.div_ceil(eff_sge),
            "{wrs} work requests for {} descriptors and {pieces} pieces",
            remote.len()
        );
    }

    let mut merged = Vec::new();
    for d in &remote {
        push_desc(&mut merged, *d);
    }
    let m_total: u64 = merged.iter().map(|d| u64::from(d.len)).sum();
    assert_eq!(m_total, r_total, "push_desc lost or made bytes");
    for w in merged.windows(2) {
        let mergeable = w[0].rkey == w[1].rkey
            && w[0].addr.checked_add(u64::from(w[0].len)) == Some(w[1].addr)
            && w[0].len.checked_add(w[1].len).is_some();
        assert!(!mergeable, "push_desc left {:?} and {:?} apart", w[0], w[1]);
    }
});
