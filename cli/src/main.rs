//! The zcio command (work in progress).
fn main() {}
