//! Compiles the `hodei.v1` protos with protox (no `protoc` binary needed),
//! generates the tonic clients and servers, and writes the encoded file
//! descriptor set to `$OUT_DIR/hodei_descriptor.bin` for gRPC reflection.

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto/hodei/v1");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            let name = path.file_name().ok_or("proto file without a name")?;
            files.push(format!("hodei/v1/{}", name.to_string_lossy()));
        }
    }
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("hodei_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
