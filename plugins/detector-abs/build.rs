//! rpath to libtorch for this crate's own test binaries (see `audit_build::libtorch_rpath`).

fn main() {
    audit_build::libtorch_rpath();
}
