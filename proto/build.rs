//! Compiles `wxauth/v1/*.proto` with protox (pure Rust), so a fresh machine needs no `protoc`.
//! The encoded descriptor set is written next to the generated code for server reflection.

use std::path::PathBuf;

/// The messages whose Debug lib.rs writes (`redacted_debug!`).
const REDACTED: &[&str] = &[
    "TokenPair",
    "LoginRequest",
    "VerifyRequest",
    "RefreshRequest",
    "LogoutRequest",
    "ListSessionsRequest",
    "DecryptDataRequest",
    "DecryptDataResponse",
    "GetPhoneNumberRequest",
    "GetPhoneNumberResponse",
    "GetWechatAccessTokenRequest",
    "GetWechatAccessTokenResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Neither prost-build nor tonic-prost-build emits rerun-if-changed on their own.
    println!("cargo:rerun-if-changed=wxauth");
    println!("cargo:rerun-if-changed=build.rs");

    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(["wxauth/v1/auth.proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("wxauth_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Messages that carry a token, a code, a phone number, encryptedData or what it decrypts
    // to: their Debug is written by hand in lib.rs, with those fields' values left out.
    tonic_prost_build::configure()
        .skip_debug(REDACTED.iter().map(|m| format!(".wxauth.v1.{m}")))
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
