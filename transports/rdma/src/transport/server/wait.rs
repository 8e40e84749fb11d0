//! How `recv` waits for the next event when no queue pair has anything to hand out: it
//! polls the completion queues itself for a while, then waits on their channels, or sleeps
//! while the connection threads take the completions.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::super::conn::lead_all;
use super::super::lock;
use super::RdmaServerConn;

impl RdmaServerConn {
    /// Lets the connection threads take completions (see `lead_all`).
    pub(super) fn background(&self) {
        for c in &self.set.lanes {
            c.poller.background(false);
        }
    }

    /// Polls every queue pair's completion queue on this thread until something is ready
    /// for `recv` (the generation moves past `gen`) or `rdma.spin_us` has passed.
    fn spin(&self, gen: u64) {
        let Some(first) = self.set.lanes.first() else {
            return;
        };
        let deadline = Instant::now() + first.poller.spin_time();
        loop {
            for c in &self.set.lanes {
                if c.poller.drain(&**c).is_err() {
                    return;
                }
            }
            if *lock(&self.shared.gen) != gen || Instant::now() >= deadline {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Nothing to hand out (the generation was `gen` when `recv` looked): takes the next
    /// request off the completion queues on this thread if it comes soon (see `Poller`,
    /// once per call of `recv`, kept in `spun`); else, while no request is being served,
    /// waits on the completion channels here, so that the next request needs no hand-off
    /// from a connection thread; else lets those threads take completions (replies' among
    /// them) and sleeps until they wake it.
    pub(super) fn wait_for_events(&self, gen: u64, spun: &mut bool) {
        let spins = self.set.lanes.iter().any(|c| c.poller.spins());
        if spins && !*spun {
            *spun = true;
            self.spin(gen);
            return;
        }
        if self.shared.in_flight.load(Ordering::SeqCst) == 0
            && lead_all(&self.set.lanes, |c| &c.poller, &|| {
                *lock(&self.shared.gen) != gen
            })
        {
            return;
        }
        self.background();
        let mut g = lock(&self.shared.gen);
        while *g == gen {
            g = match self.shared.events_cv.wait(g) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }
}
