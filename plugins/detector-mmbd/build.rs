//! rpath to libtorch for this crate's own test binaries (the plugin library itself finds libtorch
//! through the host process, which has it loaded already).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
