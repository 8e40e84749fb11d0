//! zcio-tcp (work in progress).
