//! An in-memory transport: two endpoints joined by channels.
//!
//! **A test double, not a product transport.** It copies payload (a real transport must
//! not), so it is never registered under a name a user can choose. It exists so that the
//! file protocol, the server and the client can be unit-tested without sockets.
