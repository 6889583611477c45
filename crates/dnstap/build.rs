//! Generates the dnstap protobuf types from the vendored `proto/dnstap.proto` (CC0). The file
//! is parsed by protox, in Rust: no protoc install is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/dnstap.proto");
    let fds = protox::compile(["dnstap.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
