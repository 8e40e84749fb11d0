//! What a transport (or one of its connections) can carry: [`Limits`].
//!
//! Its own module, importing nothing of the crate, so that both the configuration (which
//! holds the client's `[limits]`) and the transport contract (which negotiates them) can use
//! it without depending on each other.

/// Largest request or reply header any transport must carry.
pub const MAX_HEADER: usize = 4096;

/// What a transport (or one of its connections) can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most payload segments in one request or reply.
    pub max_segments: usize,
    /// Most payload bytes in one request or reply.
    pub max_payload: usize,
    /// Longest header.
    pub max_header: usize,
    /// Most requests in flight on one connection.
    pub max_in_flight: usize,
    /// Payload up to this many bytes travels inline with the header (RDMA); 0 = none.
    pub inline_threshold: usize,
    /// True when payload moves by RDMA (no CPU copy on either side).
    pub rdma_payload: bool,
}

impl Limits {
    /// The lower of two limit sets (what two peers can both honour).
    pub fn min(&self, o: &Limits) -> Limits {
        Limits {
            max_segments: self.max_segments.min(o.max_segments),
            max_payload: self.max_payload.min(o.max_payload),
            max_header: self.max_header.min(o.max_header),
            max_in_flight: self.max_in_flight.min(o.max_in_flight),
            inline_threshold: self.inline_threshold.min(o.inline_threshold),
            rdma_payload: self.rdma_payload && o.rdma_payload,
        }
    }
}
