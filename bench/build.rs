//! Generates the gRPC comparison point's message types and tonic service from
//! `proto/resolve.proto` without protoc: protox parses the file into a `FileDescriptorSet` and
//! tonic-prost-build generates code from that.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/resolve.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(["resolve.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
