//! A queue pair's posted receives: which receive buffer is with the device, and the check
//! that a receive completion names one that is. Pure and generic over the buffer type, so
//! it is tested on any host with plain values.
#![forbid(unsafe_code)]

use std::fmt;

/// A receive completion for a receive that is not posted: the device (or a bug) reports a
/// message in a buffer this side does not have with the device. Fails the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotPosted(pub usize);

impl fmt::Display for NotPosted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a completion for receive {}, which is not posted",
            self.0
        )
    }
}

/// One buffer per credit, each either posted (with the device, `Some`) or taken out while
/// its message is handled.
#[derive(Debug)]
pub struct Receives<B> {
    bufs: Vec<Option<B>>,
}

impl<B> Receives<B> {
    /// The receives posted at set-up, `bufs[i]` posted as receive `i`.
    pub fn new(bufs: Vec<Option<B>>) -> Receives<B> {
        Receives { bufs }
    }

    /// Receive `i` completed: its buffer, to read the message from and post again with
    /// [`repost`](Self::repost).
    pub fn take(&mut self, i: usize) -> Result<B, NotPosted> {
        self.bufs
            .get_mut(i)
            .and_then(Option::take)
            .ok_or(NotPosted(i))
    }

    /// Buffer `b` is posted again as receive `i` (whether or not the post worked: a failed
    /// post fails the connection, which [`clear`](Self::clear)s).
    pub fn repost(&mut self, i: usize, b: B) {
        if let Some(slot) = self.bufs.get_mut(i) {
            *slot = Some(b);
        }
    }

    /// Number of receives posted.
    pub fn posted(&self) -> usize {
        self.bufs.iter().filter(|b| b.is_some()).count()
    }

    /// The connection failed and its queue pair is destroyed: every buffer goes back.
    pub fn clear(&mut self) {
        for b in &mut self.bufs {
            *b = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_is_taken_once_until_it_is_posted_again() {
        let mut r = Receives::new(vec![Some("a"), Some("b")]);
        assert_eq!(r.take(1), Ok("b"));
        assert_eq!(r.posted(), 1);
        assert_eq!(r.take(1), Err(NotPosted(1)), "the same receive twice");
        r.repost(1, "b");
        assert_eq!(r.take(1), Ok("b"));
    }

    #[test]
    fn completions_for_receives_that_do_not_exist_are_refused() {
        let mut r = Receives::new(vec![Some(1u8)]);
        assert_eq!(r.take(7), Err(NotPosted(7)));
        assert_eq!(
            NotPosted(7).to_string(),
            "a completion for receive 7, which is not posted"
        );
        r.repost(7, 2);
        assert_eq!(r.posted(), 1, "nothing posted where there is no receive");
    }

    #[test]
    fn clearing_gives_every_buffer_back() {
        let mut r = Receives::new(vec![Some(1u8), Some(2), None]);
        r.clear();
        assert_eq!(r.posted(), 0);
        assert_eq!(r.take(0), Err(NotPosted(0)));
    }
}
