//! Compiles `proto/*.proto` without a system `protoc`: protox parses them into a descriptor
//! set and tonic-prost-build generates the Rust code from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/cohort.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
