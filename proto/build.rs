//! Compiles `proto/*.proto` without a system `protoc`: protox parses them into a descriptor
//! set and tonic-prost-build generates the Rust code from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/cohort.proto"], ["proto"])?;
    // Chunk payloads are `Bytes`: a model broadcast to many sites shares one buffer, and a
    // received chunk is a view of the decode buffer rather than a copy.
    tonic_prost_build::configure()
        .bytes(".cohort.v1.Chunk.data")
        .compile_fds(fds)?;
    Ok(())
}
