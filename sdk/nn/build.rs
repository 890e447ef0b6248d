//! Generates the ONNX protobuf types (prost) from proto/onnx.proto (copied from the onnx 1.23.2
//! wheel) with the protoc shipped in `protoc-bin-vendored`, and embeds an rpath to libtorch's
//! folder (from `LIBTORCH`, set in .cargo/config.toml) so this crate's test binaries run without
//! LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    prost_build::Config::new()
        .protoc_executable(protoc)
        .compile_protos(&["proto/onnx.proto"], &["proto"])
        .expect("compiling proto/onnx.proto");

    audit_build::libtorch_rpath();
}
