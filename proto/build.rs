fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A fresh machine needs no system protoc: use the one shipped in protoc-bin-vendored.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .bytes(".moe.v1.Tensor.data")
        .compile_protos(&["proto/moe.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/moe.proto");
    Ok(())
}
