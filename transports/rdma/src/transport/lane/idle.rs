//! The server's idle timeout (`server.idle_timeout`): when a connection counts as idle. It
//! depends on all of the connection's queue pairs (a request in flight on any of them keeps
//! it open), so it is decided here, apart from any one lane, from what the driver gathers.

use std::time::Duration;

/// What one look at a connection found, for its idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Requests received and not yet answered, over all of the connection's queue pairs.
    pub in_flight: usize,
    /// Whether the queue pair that looks has nothing posted in its send queue (a reply
    /// still on its way to the client is activity).
    pub send_queue_idle: bool,
    /// How long since a request last arrived or was answered, on any queue pair.
    pub quiet_for: Duration,
}

/// A connection's idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeout {
    after: Duration,
}

impl IdleTimeout {
    /// A timeout of `after`.
    pub fn new(after: Duration) -> IdleTimeout {
        IdleTimeout { after }
    }

    /// How long a connection may stay idle.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether the connection has been idle for longer than the timeout: no request in
    /// flight on any queue pair, nothing posted in the send queue, and no request arrived
    /// or answered for longer than the timeout. A request being served, however long it
    /// takes, never counts as idle.
    pub fn expired(&self, a: Activity) -> bool {
        a.in_flight == 0 && a.send_queue_idle && a.quiet_for > self.after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Activity = Activity {
        in_flight: 0,
        send_queue_idle: true,
        quiet_for: Duration::from_secs(11),
    };

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight_nothing_posted_and_quiet_past_the_timeout()
    {
        let t = IdleTimeout::new(Duration::from_secs(10));
        assert_eq!(t.after(), Duration::from_secs(10));
        assert!(t.expired(QUIET));
        let cases = [
            (
                "a request in flight on some queue pair",
                Activity {
                    in_flight: 1,
                    ..QUIET
                },
            ),
            (
                "a reply still in the send queue",
                Activity {
                    send_queue_idle: false,
                    ..QUIET
                },
            ),
            (
                "quiet for exactly the timeout",
                Activity {
                    quiet_for: Duration::from_secs(10),
                    ..QUIET
                },
            ),
            (
                "quiet for less",
                Activity {
                    quiet_for: Duration::from_secs(3),
                    ..QUIET
                },
            ),
        ];
        for (what, a) in cases {
            assert!(!t.expired(a), "{what}: {a:?}");
        }
    }
}
