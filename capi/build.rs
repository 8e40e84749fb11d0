//! Gives libzcio.so the soname C users expect (`libzcio.so.0`, as cargo-c would), so a
//! program linked against it records the ABI version, not the bare development name.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libzcio.so.0");
}
