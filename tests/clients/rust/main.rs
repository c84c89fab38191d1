//! Ask for a token the way a Rust workload does: the official `azure_identity` crate's
//! `ManagedIdentityCredential` against IMDS (169.254.169.254), with no environment
//! configuration (the end-to-end harness starts it without `AZURE_*`/`IDENTITY_*`/`MSI_*`/
//! `IMDS_*` variables).
//!
//! usage: azure-identity-rs-get-token SCOPE [--client-id ID | --resource-id ARM_ID]
//!
//! Prints one JSON line on stdout, the protocol of tests/clients/get_token.py:
//! `{"token": ..., "expires_on": ..., "elapsed": s}` on success, or `{"error": <error kind>,
//! "message": <text>, "elapsed": s}` with exit status 1, where `elapsed` is the seconds
//! `get_token` took. The token goes to the test process only, never to a log.

use std::process::ExitCode;
use std::time::Instant;

use azure_core::credentials::TokenCredential as _;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use serde_json::json;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut scope = None;
    let mut user_assigned_id = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--client-id" => user_assigned_id = args.next().map(UserAssignedId::ClientId),
            "--resource-id" => user_assigned_id = args.next().map(UserAssignedId::ResourceId),
            _ if scope.is_none() => scope = Some(arg),
            _ => {
                eprintln!("unexpected argument {arg}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(scope) = scope else {
        eprintln!("usage: azure-identity-rs-get-token SCOPE [--client-id ID | --resource-id ID]");
        return ExitCode::from(2);
    };
    // reqwest's rustls needs a process-wide provider even for plain http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tokio: {err}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let result = runtime.block_on(async {
        let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
            user_assigned_id,
            ..Default::default()
        }))?;
        credential.get_token(&[scope.as_str()], None).await
    });
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(token) => {
            println!(
                "{}",
                json!({
                    "token": token.token.secret(),
                    "expires_on": token.expires_on.unix_timestamp(),
                    "elapsed": elapsed,
                })
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!(
                "{}",
                json!({
                    "error": format!("{:?}", err.kind()),
                    "message": format!("{err:#}"),
                    "elapsed": elapsed,
                })
            );
            ExitCode::from(1)
        }
    }
}
